"""Reading a disk (image file or block device) as fixed-size blocks: digest, or HOLE for zeros.

Sparse files are asked where their data is (SEEK_DATA/SEEK_HOLE), so blocks that lie wholly in a hole
are recorded as holes without being read. Blocks are read with O_DIRECT where the filesystem allows it,
into reused page-aligned buffers: a backup then costs a fraction of the kernel time of buffered reads
and does not push the running workload's data out of the page cache.
"""
from __future__ import annotations

import bisect
import errno
import functools
import hashlib
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RpfsError
from .recovery_point import HOLE, check_name


@dataclass
class DiskSource:
    name: str
    path: Path
    size: int
    fd: int
    direct_fd: int = -1              # the same disk opened with O_DIRECT, or -1 where that is refused
    _data_starts: list[int] = field(default_factory=list)
    _data_ends: list[int] = field(default_factory=list)
    _sparse_known: bool = False

    @classmethod
    def open(cls, name: str, path: str | Path) -> "DiskSource":
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
        source = cls(name, path, size, fd)
        try:
            source.direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            pass  # tmpfs and some others refuse O_DIRECT: read through the page cache
        if stat.S_ISREG(mode):
            source._map_data_extents()
        return source

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1

    def _map_data_extents(self) -> None:
        offset = 0
        try:
            while offset < self.size:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
                end = os.lseek(self.fd, start, os.SEEK_HOLE)
                self._data_starts.append(start)
                self._data_ends.append(end)
                offset = end
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data past offset
                return  # filesystem without SEEK_DATA: read everything
        self._sparse_known = True

    def _in_hole(self, start: int, end: int) -> bool:
        if not self._sparse_known:
            return False
        i = bisect.bisect_right(self._data_starts, end - 1) - 1  # last extent starting before end
        return i < 0 or self._data_ends[i] <= start

    def block_count(self, block_size: int) -> int:
        return -(-self.size // block_size)

    def read_block(self, index: int, block_size: int, buffers: "BufferPool") -> tuple[bytes, memoryview | None]:
        """(digest, data) of one block; (HOLE, None) for a block that is all zeros.

        data is a view of a pooled buffer: hand it back with buffers.give(data) once done with it.
        """
        start = index * block_size
        length = min(block_size, self.size - start)
        if self._in_hole(start, start + length):
            return HOLE, None
        buffer = buffers.take()
        got = self._read_into(buffer, start)
        if got != length:
            buffers.give(memoryview(buffer))
            raise RpfsError(f"disk {self.name}: {self.path} changed size during the backup")
        data = memoryview(buffer)[:length]
        digest = hashlib.sha256(data).digest()
        if digest == _zero_digest(length):  # cheaper than comparing: hashing releases the GIL, no copy
            buffers.give(data)
            return HOLE, None
        return digest, data

    def _read_into(self, buffer: mmap.mmap, start: int) -> int:
        while True:
            fd = self.direct_fd if self.direct_fd >= 0 else self.fd
            try:
                return os.preadv(fd, [buffer], start)
            except OSError as e:
                if e.errno == errno.EINVAL and fd == self.direct_fd:
                    self.direct_fd = -1   # the filesystem opened but will not serve O_DIRECT reads
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


@functools.lru_cache(maxsize=8)
def _zero_digest(size: int) -> bytes:
    return hashlib.sha256(bytes(size)).digest()
