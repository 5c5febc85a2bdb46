"""Reading a disk (image file or block device) as fixed-size blocks: digest, or HOLE for zeros.

Sparse files are asked where their data is (SEEK_DATA), so blocks that lie wholly in a hole are
recorded as holes without being read. Blocks are read with O_DIRECT where the filesystem allows it,
into reused page-aligned buffers: a backup then costs a fraction of the kernel time of buffered reads
and does not push the running workload's data out of the page cache.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.store.blob import BlockCodec
from rpfs.store.recovery_point import HOLE, check_name


@dataclass
class DiskSource:
    name: str
    path: Path
    size: int
    fd: int
    direct_fd: int = -1              # the same disk opened with O_DIRECT, or -1 where that is refused
    is_file: bool = False            # a regular file can say where its holes are
    bytes_read: int = 0              # what was really read (holes are skipped)
    _refused_direct_fds: set[int] = field(default_factory=set)
    _count_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, name: str, path: str | Path, shown_as: Path | None = None) -> "DiskSource":
        """Open a disk to read; shown_as is the path recorded and named in errors (for a snapshot: the disk)."""
        check_name("disk", name)
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RpfsError(f"disk {name}: {path} does not exist") from None
        except OSError as e:
            raise RpfsError(f"disk {name}: cannot open {path}: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise RpfsError(f"disk {name}: {path} is not an image file or a block device")
            size = os.lseek(fd, 0, os.SEEK_END)
            os.pread(fd, 1, 0)  # fail now, not mid-backup, on an unreadable device
        except OSError as e:
            os.close(fd)
            raise RpfsError(f"disk {name}: cannot read {path}: {e.strerror}") from None
        except RpfsError:
            os.close(fd)
            raise
        source = cls(name, shown_as or path, size, fd, is_file=stat.S_ISREG(mode))
        try:
            source.direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            pass  # tmpfs and some others refuse O_DIRECT: read through the page cache
        return source

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd, *self._refused_direct_fds):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
        self._refused_direct_fds.clear()

    def _in_hole(self, start: int, end: int) -> bool:
        """Asked at read time, not once at open: a live image may fill a hole during the backup."""
        if not self.is_file:
            return False
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) >= end   # pread ignores the file offset
        except OSError as e:
            return e.errno == errno.ENXIO   # no data from start to the end of the file

    def block_count(self, block_size: int) -> int:
        return -(-self.size // block_size)

    def read_block(self, index: int, block_size: int, buffers: "BufferPool",
                   codec: BlockCodec) -> tuple[bytes, memoryview | None]:
        """(block id, data) of one block; (HOLE, None) for a block that is all zeros.

        data is a view of a pooled buffer: hand it back with buffers.give(data) once done with it.
        """
        start = index * block_size
        length = min(block_size, self.size - start)
        if self._in_hole(start, start + length):
            return HOLE, None
        buffer = buffers.take()
        got = self._read_into(buffer, start)
        with self._count_lock:
            self.bytes_read += got
        if got != length:
            buffers.give(memoryview(buffer))
            raise RpfsError(f"disk {self.name}: {self.path} changed size during the backup")
        data = memoryview(buffer)[:length]
        digest = codec.block_id(data)
        if digest == codec.zero_id(length):  # cheaper than comparing: hashing releases the GIL, no copy
            buffers.give(data)
            return HOLE, None
        return digest, data

    def _read_into(self, buffer: mmap.mmap, start: int) -> int:
        while True:
            fd = self.direct_fd if self.direct_fd >= 0 else self.fd
            try:
                return os.preadv(fd, [buffer], start)
            except OSError as e:
                if e.errno == errno.EINVAL and fd != self.fd:
                    # The filesystem opened it but will not serve O_DIRECT reads. Closed only at the
                    # end: another worker may be reading from it right now.
                    self._refused_direct_fds.add(fd)
                    self.direct_fd = -1
                    continue
                raise RpfsError(f"disk {self.name}: read error at offset {start} of {self.path}:"
                                f" {e.strerror}") from None


class BufferPool:
    """Page-aligned block buffers (as O_DIRECT needs), reused: no allocation or page faults per block."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def give(self, view: memoryview) -> None:
        buffer = view.obj
        view.release()
        with self._lock:
            self._free.append(buffer)

