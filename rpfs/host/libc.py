"""The few glibc calls Python has no binding for: how much memory a process keeps, when written data
starts for the disk, and punching holes in a device. The first two are hints: without glibc (another C
library) they do nothing."""
from __future__ import annotations

import ctypes
import errno
import os

M_ARENA_MAX = -8                 # mallopt parameter
SYNC_FILE_RANGE_WRITE = 2        # start writeback of the range's dirty pages, do not wait

try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _call(name: str, *args) -> None:
    function = getattr(_LIBC, name, None)
    if function is not None:
        function(*args)


def few_malloc_arenas() -> None:
    """glibc gives each worker thread a heap of its own, each keeping freed 1 MiB blocks for reuse, so a
    daemon's memory grew with its cache and then some (tools/load). Two heaps for all threads cost no
    measurable speed; mmapping every block instead (M_MMAP_THRESHOLD) cost a third of cold read speed."""
    _call("mallopt", M_ARENA_MAX, 2)


def give_back_freed_memory() -> None:
    """Hand memory glibc keeps after frees (evicted blocks) back to the system: malloc_trim."""
    _call("malloc_trim", 0)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE): on a block device the kernel does it only where the device both frees the
    range and guarantees it reads back as zeros (BLKDEV_ZERO_NOFALLBACK); else it raises (EOPNOTSUPP)."""
    if _LIBC is None:
        raise OSError(errno.ENOSYS, "no fallocate without glibc")
    if _LIBC.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_int64(offset),
                       ctypes.c_int64(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range's dirty pages now (sync_file_range), so that a long write streams to the disk
    instead of piling up dirty pages for one long fsync at its end."""
    _call("sync_file_range", fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)
