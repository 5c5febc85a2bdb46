"""A small NBD client over a unix socket: the guest-visible bytes of a disk, and its block status.

Why our own: python3-libnbd exists only for Debian's system python, not rpfs's venv, and rpfs needs a
small subset of the protocol (docs/design/nbd.md: the subset, the limits and the measured speed). It speaks
the fixed newstyle handshake, structured replies, meta contexts (base:allocation, qemu:dirty-bitmap:NAME),
NBD_OPT_GO, NBD_CMD_READ, NBD_CMD_BLOCK_STATUS and NBD_CMD_DISC, one request at a time.

Strict, because the server is a peer and a read must never return wrong bytes: every length a server
sends is bounded before anything is allocated or read, every reply must carry the handle of the request,
and a read returns exactly the bytes asked for (each byte covered once by data or a hole) or raises. Any
failure is an RpfsError of one line naming the export; after a protocol error the connection is closed.

One connection is not thread-safe: callers open one per thread (backup/nbd_source.py does).
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from rpfs.errors import RpfsError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TRANSMISSION_HAS_FLAGS = 1

CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15

STATE_HOLE, STATE_ZERO = 1, 2            # base:allocation flags
STATE_DIRTY = 1                          # qemu:dirty-bitmap:NAME flag

MAX_OPTION_REPLY = 64 << 10              # an option reply larger than this is refused
MAX_CONTEXT_NAME = 4096                  # the protocol's own limit for a meta context name
MAX_READ = 32 << 20                      # qemu's limit for one request; a read asks at most this
MAX_STATUS_REQUEST = 1 << 30             # one block status request covers at most this much
MAX_STATUS_CHUNK = 4 + 8 * (1 << 17)     # at most 131072 extents in one reply chunk
MAX_ERROR_CHUNK = 6 + 4096 + 8           # error, message (bounded), offset
MAX_CHUNKS = 1 << 16                     # chunks in one reply: a server cannot keep us busy forever
DEFAULT_TIMEOUT = 120.0                  # seconds one receive may wait

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY_REST = struct.Struct(">IQ")        # after the magic: error, handle
_STRUCTURED_REPLY_REST = struct.Struct(">HHQI")  # after the magic: flags, type, handle, length


@dataclass(frozen=True)
class Extent:
    """A run of the export with the same flags in one meta context."""
    offset: int
    length: int
    flags: int


class NbdConnection:
    """One connection to one export, in transmission phase once open() returns."""

    def __init__(self, sock: socket.socket, label: str):
        self._sock = sock
        self.label = label                  # "NBD export 'vda'": the start of every error line
        self.size = 0
        self.transmission_flags = 0
        self.max_request = MAX_READ
        self.contexts: dict[str, int] = {}  # meta context name -> id the server gave it
        self._context_names: dict[int, str] = {}
        self._handle = 0
        self._header = bytearray(32)

    @classmethod
    def open(cls, socket_path: str | Path, export: str, contexts: tuple[str, ...] = (),
             timeout: float = DEFAULT_TIMEOUT, label: str | None = None) -> "NbdConnection":
        """Connect, negotiate structured replies and the meta contexts, and select export (NBD_OPT_GO)."""
        label = label or f"NBD export {export!r}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(socket_path))
        except OSError as e:
            sock.close()
            raise RpfsError(f"{label}: cannot connect to {socket_path}: {e.strerror or e}") from None
        connection = cls(sock, label)
        try:
            connection._handshake(export, contexts)
        except BaseException:
            connection._drop()
            raise
        return connection

    # -- handshake -------------------------------------------------------------------------------------

    def _handshake(self, export: str, contexts: tuple[str, ...]) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            self._fail("not an NBD server speaking the newstyle handshake")
        if not flags & FLAG_FIXED_NEWSTYLE:
            self._fail("the server does not speak the fixed newstyle handshake")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY, b"")
        if self._option_reply(OPT_STRUCTURED_REPLY)[0] != REP_ACK:
            self._fail("structured replies were not acknowledged")
        name = export.encode()
        if len(name) > 4096:
            self._fail("export name too long")
        if contexts:
            self._set_meta_contexts(name, contexts)
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 2, INFO_EXPORT)
                     + struct.pack(">H", INFO_BLOCK_SIZE))
        have_export = False
        while True:
            kind, data = self._option_reply(OPT_GO)
            if kind == REP_ACK:
                break
            if kind != REP_INFO or len(data) < 2:
                self._fail(f"unexpected reply {kind} to NBD_OPT_GO")
            info = struct.unpack(">H", data[:2])[0]
            if info == INFO_EXPORT:
                if len(data) != 12:
                    self._fail("malformed NBD_INFO_EXPORT")
                self.size, self.transmission_flags = struct.unpack(">QH", data[2:])
                have_export = True
            elif info == INFO_BLOCK_SIZE:
                if len(data) != 14:
                    self._fail("malformed NBD_INFO_BLOCK_SIZE")
                _minimum, _preferred, maximum = struct.unpack(">III", data[2:])
                if maximum:
                    self.max_request = min(MAX_READ, maximum)
        if not have_export:
            self._fail("the server did not say the export's size")
        if self.size >= 1 << 63:
            self._fail(f"implausible export size {self.size}")

    def _set_meta_contexts(self, name: bytes, contexts: tuple[str, ...]) -> None:
        queries = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in contexts)
        self._option(OPT_SET_META_CONTEXT,
                     struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + queries)
        while True:
            kind, data = self._option_reply(OPT_SET_META_CONTEXT)
            if kind == REP_ACK:
                break
            if kind != REP_META_CONTEXT or len(data) < 5:
                self._fail(f"unexpected reply {kind} to NBD_OPT_SET_META_CONTEXT")
            context_id = struct.unpack(">I", data[:4])[0]
            try:
                context = data[4:].decode()
            except UnicodeDecodeError:
                self._fail("a meta context name is not UTF-8")
            if context not in contexts or context in self.contexts or context_id in self._context_names:
                self._fail(f"the server chose a meta context not asked for, or twice: {context!r}")
            self.contexts[context] = context_id
            self._context_names[context_id] = context
        missing = [c for c in contexts if c not in self.contexts]
        if missing:
            self._fail(f"no meta context {missing[0]!r} (the export has no such bitmap or allocation map)")

    def _option(self, option: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, replied, kind, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPTION_REPLY_MAGIC or replied != option:
            self._fail("malformed option reply")
        if length > MAX_OPTION_REPLY:
            self._fail(f"option reply of {length} bytes, more than {MAX_OPTION_REPLY}")
        data = self._recv(length) if length else b""
        if kind & REP_FLAG_ERROR:
            message = _printable(data)
            self._fail(f"refused ({_OPTION_ERRORS.get(kind, hex(kind))})" + (f": {message}" if message else ""))
        return kind, data

    # -- transmission ----------------------------------------------------------------------------------

    def read_into(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Fill buffer with the export's bytes from offset: all of it, or raise."""
        view = memoryview(buffer).cast("B")
        length = len(view)
        if offset < 0 or offset + length > self.size:
            raise RpfsError(f"{self.label}: read of {length} bytes at {offset} beyond its size {self.size}")
        done = 0
        while done < length:
            part = min(self.max_request, length - done)
            self._read_part(view[done:done + part], offset + done)
            done += part

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(buffer, offset)
        return bytes(buffer)

    def _read_part(self, view: memoryview, offset: int) -> None:
        length = len(view)
        handle = self._request(CMD_READ, offset, length)
        covered: list[tuple[int, int]] = []
        error = None
        for flags, kind, chunk_length in self._chunks(handle, simple_data=view):
            if kind == CHUNK_OFFSET_DATA:
                if chunk_length < 8:
                    self._fail("malformed data chunk")
                start = struct.unpack(">Q", self._recv(8))[0] - offset
                size = chunk_length - 8
                if start < 0 or start + size > length:
                    self._fail("a data chunk outside the range read")
                self._recv_into(view[start:start + size])
                covered.append((start, size))
            elif kind == CHUNK_OFFSET_HOLE:
                if chunk_length != 12:
                    self._fail("malformed hole chunk")
                chunk_offset, size = struct.unpack(">QI", self._recv(12))
                start = chunk_offset - offset
                if start < 0 or start + size > length:
                    self._fail("a hole chunk outside the range read")
                view[start:start + size] = bytes(size)
                covered.append((start, size))
            elif kind == CHUNK_NONE and chunk_length == 0:
                pass
            elif kind == "simple":
                covered.append((0, length))
            elif kind & CHUNK_ERROR_BIT:
                error = self._error_chunk(chunk_length)
            else:
                self._fail(f"unexpected reply chunk type {kind} to a read")
        if error:
            raise RpfsError(f"{self.label}: read of {length} bytes at {offset} failed: {error}")
        covered.sort()
        end = 0
        for start, size in covered:
            if start != end or size == 0:
                self._fail(f"a read at {offset} was not answered with each byte exactly once")
            end = start + size
        if end != length:
            self._fail(f"a read at {offset} was answered short ({end} of {length} bytes)")

    def block_status(self, context: str, offset: int, length: int) -> list[Extent]:
        """The extents of context from offset: they start at offset, cover at least one byte, never go past
        offset + length (a server may answer a shorter stretch: map() asks again from where it ended)."""
        if context not in self.contexts:
            raise RpfsError(f"{self.label}: meta context {context!r} was not negotiated")
        length = min(length, MAX_STATUS_REQUEST, self.size - offset)
        if offset < 0 or length <= 0:
            raise RpfsError(f"{self.label}: block status at {offset} beyond its size {self.size}")
        handle = self._request(CMD_BLOCK_STATUS, offset, length)
        found: list[Extent] | None = None
        error = None
        for flags, kind, chunk_length in self._chunks(handle, simple_data=None):
            if kind == CHUNK_BLOCK_STATUS:
                if chunk_length < 12 or (chunk_length - 4) % 8 or chunk_length > MAX_STATUS_CHUNK:
                    self._fail(f"malformed block status chunk of {chunk_length} bytes")
                data = self._recv(chunk_length)
                context_id = struct.unpack(">I", data[:4])[0]
                if context_id not in self._context_names:
                    self._fail(f"block status for an unknown meta context id {context_id}")
                if self._context_names[context_id] != context:
                    continue
                if found is not None:
                    self._fail(f"block status for {context!r} sent twice")
                found = self._extents(data, offset, length)
            elif kind == CHUNK_NONE and chunk_length == 0:
                pass
            elif kind == "simple":
                self._fail("a block status answered by a simple reply")
            elif kind & CHUNK_ERROR_BIT:
                error = self._error_chunk(chunk_length)
            else:
                self._fail(f"unexpected reply chunk type {kind} to a block status")
        if error:
            raise RpfsError(f"{self.label}: block status at {offset} failed: {error}")
        if not found:
            self._fail(f"no block status for {context!r} at {offset}")
        return found

    def _extents(self, data: bytes, offset: int, length: int) -> list[Extent]:
        extents, position, end = [], offset, offset + length
        for extent_length, flags in struct.iter_unpack(">II", memoryview(data)[4:]):
            if extent_length == 0:
                self._fail("a block status extent of length 0")
            if position >= end:
                break          # the last extent may run past the request; what follows it is ignored
            extent_length = min(extent_length, end - position)
            extents.append(Extent(position, extent_length, flags))
            position += extent_length
        return extents

    def map(self, context: str, offset: int = 0, length: int | None = None):
        """Every extent of context from offset to offset + length (to the end by default), in order."""
        end = self.size if length is None else min(self.size, offset + length)
        while offset < end:
            for extent in self.block_status(context, offset, end - offset):
                yield extent
                offset = extent.offset + extent.length

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC: no reply) and close; safe to call twice."""
        if self._sock is None:
            return
        try:
            self._send(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, self._next_handle(), 0, 0))
        except RpfsError:
            pass
        self._drop()

    def __enter__(self) -> "NbdConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- replies ---------------------------------------------------------------------------------------

    def _request(self, command: int, offset: int, length: int) -> int:
        handle = self._next_handle()
        self._send(_REQUEST.pack(REQUEST_MAGIC, 0, command, handle, offset, length))
        return handle

    def _next_handle(self) -> int:
        self._handle = (self._handle + 1) & ((1 << 64) - 1)
        return self._handle

    def _chunks(self, handle: int, simple_data: memoryview | None):
        """(flags, type, length) of each reply chunk to the request, its header read; the caller reads
        the payload. A simple reply comes as type "simple" (its data, for a read, already in simple_data)."""
        for _ in range(MAX_CHUNKS):
            header = memoryview(self._header)
            self._recv_into(header[:4])
            magic = struct.unpack(">I", header[:4])[0]
            if magic == SIMPLE_REPLY_MAGIC:
                self._recv_into(header[4:16])
                error, got = _SIMPLE_REPLY_REST.unpack(header[4:16])
                if got != handle:
                    self._fail("a reply to a request never sent (handle mismatch)")
                if error:
                    raise RpfsError(f"{self.label}: the server answered {_errno_name(error)}")
                if simple_data is not None:
                    self._recv_into(simple_data)
                yield 0, "simple", 0
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                self._fail(f"bad reply magic {magic:#x}")
            self._recv_into(header[4:20])
            flags, kind, got, length = _STRUCTURED_REPLY_REST.unpack(header[4:20])
            if got != handle:
                self._fail("a reply to a request never sent (handle mismatch)")
            yield flags, kind, length
            if flags & REPLY_FLAG_DONE:
                return
        self._fail(f"more than {MAX_CHUNKS} chunks in one reply")

    def _error_chunk(self, length: int) -> str:
        if length < 6 or length > MAX_ERROR_CHUNK:
            self._fail(f"malformed error chunk of {length} bytes")
        data = self._recv(length)
        error, message_length = struct.unpack(">IH", data[:6])
        if 6 + message_length > length:
            self._fail("malformed error chunk")
        message = _printable(data[6:6 + message_length])
        return _errno_name(error) + (f" ({message})" if message else "")

    # -- the socket ------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise RpfsError(f"{self.label}: the connection is closed")
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._drop()
            raise RpfsError(f"{self.label}: the server went away: {e.strerror or e}") from None

    def _recv(self, length: int) -> bytes:
        buffer = bytearray(length)
        self._recv_into(memoryview(buffer))
        return bytes(buffer)

    def _recv_into(self, view: memoryview) -> None:
        if self._sock is None:
            raise RpfsError(f"{self.label}: the connection is closed")
        got, length = 0, len(view)
        try:
            while got < length:
                n = self._sock.recv_into(view[got:])
                if n == 0:
                    self._fail("the server closed the connection")
                got += n
        except socket.timeout:
            self._fail("the server did not answer in time")
        except OSError as e:
            self._fail(f"the server went away: {e.strerror or e}")

    def _fail(self, why: str):
        """A protocol error: the connection cannot be trusted any more."""
        self._drop()
        raise RpfsError(f"{self.label}: {why}")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_OPTION_ERRORS = {REP_FLAG_ERROR | n: name for n, name in enumerate(
    ["", "unsupported", "policy", "invalid", "platform", "TLS required", "unknown export", "shutting down",
     "block size required", "too big"]) if n}


def _errno_name(error: int) -> str:
    """NBD error numbers are Linux's for the few the protocol names."""
    return os.strerror(error) if 0 < error < 256 else f"error {error}"


def _printable(data: bytes) -> str:
    """A server's message, bounded, its control characters escaped."""
    text = data[:512].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
