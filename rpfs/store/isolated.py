"""A read-only store whose LMDB reads run in child processes, for the long-running daemons and verify.

LMDB 0.9 has no checksums on its own pages: a damaged B-tree page can make the process that reads it
crash by SIGBUS (docs/design/reader-processes.md), which no Python code can catch. The mount and instant-restore
daemons therefore never map the LMDB file themselves: each read is a request to a reader process
(`python -I -m rpfs.store.isolated`, host/python_child.py), and a reader that crashes costs one read an
EIO, not the mount. The daemon still decodes and verifies every block (serve/image.py), so a reader can
never hand it wrong bytes unnoticed. For a random read a reader sends only the frames the read needs
(blob.Cut), not the whole blob: copying 1 MiB through the socket cost more than decoding 64 KiB. verify
reads through it too, so that it names the recovery points such a page damages instead of dying with them.

Block maps are fetched in pieces and kept (recovery points never change), so a sequential reader asks
a reader process for a map piece once per MAP_PIECE blocks, not once per block. For an encrypted store
each reader is handed the master key as the first message on its socket (never on its command line or
in its environment); it checks map pieces and opens records, and the daemon opens and checks blocks.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
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
READERS = 5                # reader processes at most, 15 MiB each: the mount's 4 worker threads, and lookups
MAP_PIECES_KEPT = 512      # at most 16 MiB of block map pieces kept
SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)   # root may go past net.core.wmem_max
# What a reader process answers; nothing else reaches the store from a request.
REQUESTS = ("describe", "point", "points", "latest_point_id", "vms", "point_ids", "has_point", "stored_bytes",
            "blob", "blob_cut", "map_piece", "block_map")


class IsolatedStore(KeptByLeases):
    """The read side of Store that the daemons use, served by reader processes (a RecoverySource: source.py)."""

    parallel_reads: int | None = None
    kept_snapshots = True

    def __init__(self, path: Path, master: bytes | None = None):
        self.path, self._master = path, master
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
    def open(cls, path: Path | str, master: bytes | None = None) -> "IsolatedStore":
        return cls(Path(path), master)

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
        the block: only the frames it lies in, as a blob.Cut that decode takes instead of the blob)."""
        stored = self._call("blob", digest) if part is None else self._call("blob_cut", digest, *part)
        return None if stored is None else decode(stored if isinstance(stored, Cut) else memoryview(stored))

    def block_map(self, map_key: bytes) -> bytes:
        """A whole block map, for scans that visit every block anyway (verify)."""
        return self._call("block_map", map_key)

    def block_digest(self, map_key: bytes, index: int) -> bytes:
        return self._pieces.digest(map_key, index, lambda key, piece: self._call("map_piece", key, piece))

    # -- the reader processes ----------------------------------------------------------------------
    def _call(self, request: str, *args):
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
        self._idle.put(reader)
        kind, value = answer
        if kind == "ok":
            return value
        exit_code, message = value
        raise CorruptBlockError(message) if exit_code == EXIT_CORRUPT else RpfsError(message, exit_code)

    def _take_reader(self) -> "_Reader":
        """An idle reader, a new one while there are fewer than READERS, or the next one put back."""
        while True:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._count_lock:
                if len(self._readers) < READERS:
                    reader = _Reader(self.path, self._master)
                    self._readers.append(reader)
                    return reader
            try:
                return self._idle.get(timeout=1.0)   # again: a reader that crashed meanwhile is not put back
            except queue.Empty:
                continue


class _ReaderDied(Exception):
    pass


class _Reader:
    """One reader process and this end of its socket; used by one thread at a time."""

    def __init__(self, path: Path, master: bytes | None):
        mine, theirs = socket.socketpair()
        for end in (mine, theirs):   # a whole blob in one write: fewer wake-ups per block
            try:
                end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
            except OSError:
                pass
        try:
            self.process = start_python("rpfs.store.isolated", [os.path.abspath(path), str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.connection = Connection(mine.detach())
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
            return kind, value
        except (EOFError, OSError):
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:   # alive but not answering: it is of no use any more
                self.process.kill()
                code = self.process.wait()
            raise _ReaderDied(f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}") from None

    def close(self) -> None:
        self.connection.close()   # the reader ends at end of file
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _answer(store: Store, request: str, args: tuple, connection: Connection) -> None:
    """Send the answer to one request; a blob goes straight from LMDB's pages to the socket."""
    if request == "describe":
        value = (store.block_size, store.format_version, store.meta.get("block_id", "sha256"), store.store_id,
                 store.encrypted)
    elif request == "blob":
        with store.read() as txn:
            stored = txn.get(args[0], db=store.db("blocks"))
            if stored is not None:
                connection.send_bytes(_HEADER_BYTES_FOLLOW)
                connection.send_bytes(stored)
                return
            value = None
    elif request == "blob_cut":
        value = store.get_blob(args[0], lambda stored: cut(stored, *args[1:]))
    else:
        value = getattr(store, request)(*args)
    connection.send_bytes(pickle.dumps(("ok", value), protocol=pickle.HIGHEST_PROTOCOL))


_HEADER_BYTES_FOLLOW = pickle.dumps(("bytes", None))


def serve_reads(path: str, fd: int) -> None:
    """A reader process: answer requests until the daemon closes its end (or dies)."""
    connection = Connection(fd)
    no_core_dumps()   # a reader may die of SIGBUS (a damaged page) holding the master key: no core file
    try:
        master = connection.recv_bytes()
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
            _answer(store, request, args, connection)
            continue
        except RpfsError as e:
            failure = (e.exit_code, e.message)
        except Exception as e:   # lmdb's own errors on a damaged page: this read fails, the next may not
            failure = (3, f"cannot read the store {path}: {e}")
        connection.send_bytes(pickle.dumps(("error", failure)))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is for the daemon; the reader ends with it
    serve_reads(sys.argv[1], int(sys.argv[2]))
