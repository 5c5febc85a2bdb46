"""A read-only store whose LMDB reads run in child processes, for the long-running daemons and verify.

LMDB 0.9 has no checksums on its own pages: a damaged B-tree page can make the process that reads it
crash by SIGBUS (docs/design/reader-processes.md), which no Python code can catch. The mount and instant-restore
daemons therefore never map the LMDB file themselves: each read is a request to a reader process
(`python -I -m rpfs.store.isolated`, host/python_child.py), and a reader that crashes costs one read an
EIO, not the mount. The daemon still decodes and verifies every block (serve/image.py), so a reader can
never hand it wrong bytes unnoticed. For a random read a reader sends only the frames the read needs
(blob.Cut), not the whole blob: copying 1 MiB through the socket cost more than decoding 64 KiB. verify
reads through it too, so that it names the recovery points such a page damages instead of dying with them.

A blob (or a Cut) goes through memory shared with its reader (a memfd the daemon makes), not through the
socket: the reader copies it there from LMDB's pages and answers its length, and the daemon decodes it
from there before the reader takes another request (as Store.get_blob decodes from LMDB's pages inside
its transaction). One copy instead of the socket's copies and the chunked receive into fresh buffers (the
daemon's half of the hop cost as much as decoding the block); so at most READERS blocks decode at once. A
blob larger than that memory goes through the socket as before.

Block maps are fetched in pieces and kept (recovery points never change), so a sequential reader asks
a reader process for a map piece once per MAP_PIECE blocks, not once per block. For an encrypted store
each reader is handed the master key as the first message on its socket (never on its command line or
in its environment); it checks map pieces and opens records, and the daemon opens and checks blocks.
"""
from __future__ import annotations

import mmap
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, TypeVar

from rpfs.errors import EXIT_CORRUPT, CorruptBlockError, RpfsError
from rpfs.host.libc import no_core_dumps
from rpfs.host.python_child import start_python
from rpfs.store.blob import BlockCodec, Cut, cut
from rpfs.store.crypto import Keyring
from rpfs.store.key_slots import KeyChoice
from rpfs.store.leases import KeptByLeases
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import MapPieces, Store

T = TypeVar("T")
READERS = 5                # reader processes at most, 13 MiB each: the mount's 4 worker threads, and lookups
MAP_PIECES_KEPT = 512      # at most 16 MiB of block map pieces kept
SOCKET_BUFFER = 4 << 20
SHARED_BYTES = 4 << 20     # memory shared with each reader for blobs: a 1 MiB block's blob, or a 4 MiB one's
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)   # root may go past net.core.wmem_max
# What a reader process answers; nothing else reaches the store from a request.
REQUESTS = ("describe", "point", "points", "latest_point_id", "vms", "point_ids", "has_point", "stored_bytes",
            "blob", "blob_cut", "map_piece", "block_map")


class IsolatedStore(KeptByLeases):
    """The read side of Store that the daemons use, served by reader processes (a RecoverySource: source.py)."""

    parallel_reads: int | None = None
    kept_snapshots = True

    def __init__(self, path: Path, master: bytes | None = None, shared_bytes: int = SHARED_BYTES):
        """shared_bytes: the memory shared with each reader; a larger blob goes through the socket."""
        self.path, self._master, self._shared_bytes = path, master, shared_bytes
        self._idle: queue.Queue[_Reader] = queue.Queue()   # in turn: a reader that died is found soon
        self._count_lock = threading.Lock()
        self._readers: list[_Reader] = []
        self._pieces = MapPieces(MAP_PIECES_KEPT)
        try:
            # fails here if the store does not open, or the key does not open it
            self.block_size, self.format_version, block_id, store_id, encrypted = self._call("describe")
        except BaseException:
            self.close()
            raise
        self.codec = BlockCodec(block_id, keyring=Keyring(master, store_id) if encrypted else None)

    @classmethod
    def open(cls, path: Path | str, master: bytes | None = None, shared_bytes: int = SHARED_BYTES) -> "IsolatedStore":
        return cls(Path(path), master, shared_bytes)

    def close(self) -> None:
        with self._count_lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()

    def __enter__(self) -> "IsolatedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def master_key(self) -> bytes | None:
        return self._master

    # -- the read side (source.py): already isolated; points kept by leases (KeptByLeases) ------------
    def isolated(self) -> AbstractContextManager["IsolatedStore"]:
        return nullcontext(self)   # so already; left open for its owner to close

    # -- the read methods the daemons use (the same as Store's) ------------------------------------
    map_key = staticmethod(Store.map_key)

    def point(self, vm: str, point_id: str | None = None) -> RecoveryPoint:
        return self._call("point", vm, point_id)

    def points(self, vm: str | None = None) -> list[RecoveryPoint]:
        return self._call("points", vm)

    def latest_point_id(self, vm: str) -> str | None:
        return self._call("latest_point_id", vm)

    def vms(self) -> list[str]:
        return self._call("vms")

    def point_ids(self, vm: str) -> list[str]:
        return self._call("point_ids", vm)

    def has_point(self, vm: str, point_id: str) -> bool:
        return self._call("has_point", vm, point_id)

    def stored_bytes(self) -> int:
        return self._call("stored_bytes")

    def get_blob(self, digest: bytes, decode: Callable[[memoryview | Cut], T] = bytes,
                 part: tuple[int, int] | None = None) -> T | None:
        """A stored blob, decoded here: a reader process only copies it out of LMDB (with part, a range of
        the block: only the frames it lies in, as a blob.Cut that decode takes instead of the blob). decode
        runs while the reader is held: what it is given is valid only until it returns."""
        def use(stored):
            return None if stored is None else decode(stored if isinstance(stored, Cut) else memoryview(stored))
        return self._call("blob", digest, use=use) if part is None else self._call("blob_cut", digest, *part, use=use)

    def block_map(self, map_key: bytes) -> bytes:
        """A whole block map, for scans that visit every block anyway (verify)."""
        return self._call("block_map", map_key)

    def block_digest(self, map_key: bytes, index: int) -> bytes:
        return self._pieces.digest(map_key, index, lambda key, piece: self._call("map_piece", key, piece))

    # -- the reader processes ----------------------------------------------------------------------
    def _call(self, request: str, *args, use: Callable | None = None):
        """The reader's answer to request, or use(answer) while the reader is still held (an answer in
        shared memory is valid only until then)."""
        reader = self._take_reader()
        try:
            answer = reader.ask(request, args)
        except BaseException as e:   # the exchange is cut short: this reader is not used again
            reader.close()
            with self._count_lock:
                self._readers.remove(reader)
            if isinstance(e, _ReaderDied):
                raise CorruptBlockError(f"reading the store {self.path} crashed its reader process ({e}): the"
                                        " store is damaged where this read went (rpfs check --read-data)") from None
            raise
        try:
            kind, value = answer
            if kind == "ok":
                return value if use is None else use(value)
            exit_code, message = value
            raise CorruptBlockError(message) if exit_code == EXIT_CORRUPT else RpfsError(message, exit_code)
        finally:
            reader.done()
            self._idle.put(reader)

    def _take_reader(self) -> "_Reader":
        """An idle reader, a new one while there are fewer than READERS, or the next one put back."""
        while True:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._count_lock:
                if len(self._readers) < READERS:
                    reader = _Reader(self.path, self._master, self._shared_bytes)
                    self._readers.append(reader)
                    return reader
            try:
                return self._idle.get(timeout=1.0)   # again: a reader that crashed meanwhile is not put back
            except queue.Empty:
                continue


class _ReaderDied(Exception):
    pass


class _Messages:
    """Length-prefixed messages on a socket (multiprocessing.connection's framing cost each reader 2 MiB of
    imports, and its receive went through a BytesIO)."""

    LENGTH = struct.Struct("<Q")

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send_bytes(self, data: bytes | memoryview) -> None:
        if len(data) <= 1 << 16:
            self.sock.sendall(self.LENGTH.pack(len(data)) + data)
        else:   # a large blob: no joined copy
            self.sock.sendall(self.LENGTH.pack(len(data)))
            self.sock.sendall(data)

    def recv_bytes(self) -> bytearray:
        """The next message; EOFError at the end of the stream."""
        size, = self.LENGTH.unpack(self._exactly(self.LENGTH.size))
        return self._exactly(size)

    def _exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError
            got += n
        return buffer

    def close(self) -> None:
        self.sock.close()


class _Reader:
    """One reader process, this end of its socket and the memory shared with it; used by one thread at a time."""

    def __init__(self, path: Path, master: bytes | None, shared_bytes: int):
        mine, theirs = socket.socketpair()
        for end in (mine, theirs):   # a whole blob in one write: fewer wake-ups per block
            try:
                end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
            except OSError:
                pass
        shared_fd = os.memfd_create("rpfs-reader", os.MFD_CLOEXEC)
        try:
            os.ftruncate(shared_fd, shared_bytes)
            self.shared = mmap.mmap(shared_fd, shared_bytes)   # pages only as blobs touch them
            self.process = start_python("rpfs.store.isolated", [os.path.abspath(path), str(theirs.fileno()),
                                                                str(shared_fd)],
                                        pass_fds=(theirs.fileno(), shared_fd), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
            os.close(shared_fd)
        self.connection = _Messages(mine)
        self._views: list[memoryview] = []
        try:
            self.connection.send_bytes(master or b"")
        except OSError:
            pass   # the reader died at once: the first request says so

    def ask(self, request: str, args: tuple):
        try:
            self.connection.send_bytes(pickle.dumps((request, args)))
            kind, value = pickle.loads(self.connection.recv_bytes())
            if kind == "bytes":   # a blob follows as it is, copied once by the kernel
                kind, value = "ok", self.connection.recv_bytes()
            elif kind == "shared":   # valid until done(): the reader writes there again for the next request
                kind, value = "ok", self._shared_answer(*value)
            return kind, value
        except (EOFError, OSError):
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:   # alive but not answering: it is of no use any more
                self.process.kill()
                code = self.process.wait()
            raise _ReaderDied(f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}") from None

    def _shared_answer(self, size: int, cut_at: int | None = None, first: int = 0) -> memoryview | Cut:
        """The blob (or the Cut: head before cut_at, frames after) the reader put in shared memory, as
        views of it valid until done()."""
        if not 0 <= size <= len(self.shared) or not (cut_at is None or 0 <= cut_at <= size):
            raise OSError("a reader process answered a size out of range")
        self._views = [memoryview(self.shared)]
        view = self._views[0]
        if cut_at is None:
            self._views.append(view[:size])
            return self._views[-1]
        self._views += [view[:cut_at], view[cut_at:size]]
        return Cut(self._views[1], first, self._views[2])

    def done(self) -> None:
        """The last answer is used: its views of the shared memory are let go."""
        for view in reversed(self._views):
            view.release()
        self._views = []

    def close(self) -> None:
        self.connection.close()   # the reader ends at end of file
        self.shared.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _answer(store: Store, request: str, args: tuple, connection: _Messages, shared: mmap.mmap) -> None:
    """Send the answer to one request; a blob goes straight from LMDB's pages to the shared memory (or,
    larger, to the socket)."""
    if request == "describe":
        value = (store.block_size, store.format_version, store.meta.get("block_id", "sha256"), store.store_id,
                 store.encrypted)
    elif request == "blob":
        with store.read() as txn:
            stored = txn.get(args[0], db=store.db("blocks"))
            if stored is not None and len(stored) <= len(shared):
                shared[:len(stored)] = stored
                connection.send_bytes(pickle.dumps(("shared", (len(stored),))))
                return
            if stored is not None:
                connection.send_bytes(_HEADER_BYTES_FOLLOW)
                connection.send_bytes(stored)
                return
            value = None
    elif request == "blob_cut":
        value = store.get_blob(args[0], lambda stored: cut(stored, *args[1:]))
        if isinstance(value, Cut) and len(value.head) + len(value.frames) <= len(shared):
            head, frames = len(value.head), len(value.frames)
            shared[:head], shared[head:head + frames] = value.head, value.frames
            connection.send_bytes(pickle.dumps(("shared", (head + frames, head, value.first))))
            return
    else:
        value = getattr(store, request)(*args)
    connection.send_bytes(pickle.dumps(("ok", value), protocol=pickle.HIGHEST_PROTOCOL))


_HEADER_BYTES_FOLLOW = pickle.dumps(("bytes", None))


def serve_reads(path: str, fd: int, shared_fd: int) -> None:
    """A reader process: answer requests until the daemon closes its end (or dies)."""
    connection = _Messages(socket.socket(fileno=fd))
    shared = mmap.mmap(shared_fd, 0)
    os.close(shared_fd)
    no_core_dumps()   # a reader may die of SIGBUS (a damaged page) holding the master key: no core file
    try:
        master = bytes(connection.recv_bytes())
        store = Store.open(path, readonly=True, keys=KeyChoice(master=master or None))
    except EOFError:
        return
    except RpfsError as e:
        store = e
    while True:
        try:
            request, args = pickle.loads(connection.recv_bytes())
        except EOFError:
            return
        try:
            if isinstance(store, RpfsError):
                raise store
            if request not in REQUESTS:
                raise RpfsError(f"unknown request {request!r}")
            _answer(store, request, args, connection, shared)
            continue
        except RpfsError as e:
            failure = (e.exit_code, e.message)
        except Exception as e:   # lmdb's own errors on a damaged page: this read fails, the next may not
            failure = (3, f"cannot read the store {path}: {e}")
        connection.send_bytes(pickle.dumps(("error", failure)))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is for the daemon; the reader ends with it
    serve_reads(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
