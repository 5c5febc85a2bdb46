"""A disk read over NBD as the guest sees it (raw bytes, whatever the image format): a DiskSource for the
backup pipeline, for a running domain's backup export (libvirt pull mode) or a shut-off domain's images
exported by rpfs/vm/image_export.py.

Worker threads read blocks at once; an NBD connection is not thread-safe, so each thread has its own,
opened on its first read and all closed by close(). Blocks wholly in a zero extent of base:allocation are
holes without a read: the map is asked once, in large ranges, on the first read. That is right because
what is exported does not change while it is read (libvirt's backup export is a point-in-time view; our
own exports are read-only images of a shut-off domain). A block that reads as zeros is a hole anyway.
"""
from __future__ import annotations

import threading
from pathlib import Path

from rpfs.backup.source import BufferPool
from rpfs.errors import RpfsError
from rpfs.store.blob import BlockCodec
from rpfs.store.recovery_point import HOLE, check_name
from rpfs.vm.nbd import STATE_DIRTY, STATE_ZERO, NbdConnection

ALLOCATION = "base:allocation"


class NbdDiskSource:
    """Drop-in for DiskSource: name, path, size, block_count, read_block, bytes_read, close."""

    def __init__(self, name: str, socket_path: Path, export: str, shown_as: str,
                 contexts: tuple[str, ...], first: NbdConnection):
        self.name = name
        self.path = shown_as                # recorded on the point and named in errors
        self.socket_path, self.export, self.contexts = socket_path, export, contexts
        self.size = first.size
        self.bytes_read = 0                 # bytes really read (holes are skipped)
        self._first = first                 # for block status only, under _lock
        self._connections = [first]
        self._local = threading.local()     # each reading thread's own connection
        self._lock = threading.Lock()
        self._zero_blocks: tuple[int, bytearray] | None = None   # (block size, 1 per block all zeros)

    @classmethod
    def open(cls, name: str, socket_path: str | Path, export: str, shown_as: str,
             contexts: tuple[str, ...] = (ALLOCATION,)) -> "NbdDiskSource":
        check_name("disk", name)
        socket_path = Path(socket_path)
        first = NbdConnection.open(socket_path, export, contexts, label=cls._label(name, export))
        return cls(name, socket_path, export, shown_as, tuple(contexts), first)

    @staticmethod
    def _label(name: str, export: str) -> str:
        return f"disk {name} (NBD export {export!r})"

    def block_count(self, block_size: int) -> int:
        return -(-self.size // block_size)

    def read_block(self, index: int, block_size: int, buffers: BufferPool,
                   codec: BlockCodec) -> tuple[bytes, memoryview | None]:
        """(block id, data) of one block; (HOLE, None) for a block that is all zeros. data is a view of a
        pooled buffer: hand it back with buffers.give(data)."""
        start = index * block_size
        length = min(block_size, self.size - start)
        if length <= 0:
            raise RpfsError(f"disk {self.name}: block {index} beyond the disk's end")
        if self._zero_map(block_size)[index]:
            return HOLE, None
        buffer = buffers.take()
        data = memoryview(buffer)[:length]
        try:
            self._connection().read_into(data, start)
        except BaseException:
            buffers.give(data)
            raise
        with self._lock:
            self.bytes_read += length
        digest = codec.block_id(data)
        if digest == codec.zero_id(length):
            buffers.give(data)
            return HOLE, None
        return digest, data

    def dirty_blocks(self, context: str, block_size: int) -> bytearray:
        """1 per block that no dirty extent of the bitmap context touches (unchanged), 0 per dirty block:
        what the pipeline's TrackedChanges.unchanged wants."""
        unchanged = bytearray(b"\1") * self.block_count(block_size)
        with self._lock:
            for extent in self._first.map(context):
                if extent.flags & STATE_DIRTY:
                    first = extent.offset // block_size
                    last = (extent.offset + extent.length - 1) // block_size
                    unchanged[first:last + 1] = bytes(last + 1 - first)
        return unchanged

    def _zero_map(self, block_size: int) -> bytearray:
        """1 per block that lies wholly in extents that read as zeros (all 0 without base:allocation)."""
        known = self._zero_blocks
        if known is not None and known[0] == block_size:
            return known[1]
        with self._lock:
            if self._zero_blocks is None or self._zero_blocks[0] != block_size:
                zeros = bytearray(self.block_count(block_size))
                if ALLOCATION in self.contexts:
                    self._mark_zero_blocks(zeros, block_size)
                self._zero_blocks = (block_size, zeros)
            return self._zero_blocks[1]

    def _mark_zero_blocks(self, zeros: bytearray, block_size: int) -> None:
        run_start = None   # start of the current run of zero extents
        for extent in self._first.map(ALLOCATION):
            if extent.flags & STATE_ZERO:
                if run_start is None:
                    run_start = extent.offset
                continue
            if run_start is not None:
                self._mark_run(zeros, block_size, run_start, extent.offset)
                run_start = None
        if run_start is not None:
            self._mark_run(zeros, block_size, run_start, self.size)

    def _mark_run(self, zeros: bytearray, block_size: int, start: int, end: int) -> None:
        first = -(-start // block_size)                       # the first block starting inside the run
        last = end // block_size if end < self.size else self.block_count(block_size)   # blocks ending in it
        if last > first:
            zeros[first:last] = b"\1" * (last - first)

    def _connection(self) -> NbdConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = NbdConnection.open(self.socket_path, self.export, (),
                                            label=self._label(self.name, self.export))
            if connection.size != self.size:
                connection.close()
                raise RpfsError(f"disk {self.name}: NBD export {self.export!r} changed size")
            with self._lock:
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
