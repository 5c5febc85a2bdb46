"""Change tracking: which blocks of a new reflink snapshot are those of the previous one, asked of the
filesystem (FIEMAP) instead of read and hashed.

Two snapshots of the same image on a reflink filesystem share the physical extents of every range the
VM did not write in between: a write to a shared extent is copied on write, so it lands elsewhere. A
block whose byte range maps to the same physical ranges, with the same written/unwritten state, in
both snapshots therefore holds the same bytes, and its id is the previous recovery point's. The old
snapshot is never written (0400, and its size and mtime are checked), so none of its extents can be
freed and reused meanwhile. Anything FIEMAP cannot vouch for (delayed allocation, inline or encoded
data, an unknown location) counts as changed and is read; so does a block at either end of a size
change. Asked once, before reading: the new snapshot does not change either.
"""
from __future__ import annotations

import bisect
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
HEADER = struct.Struct("=QQLLLL")            # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count
EXTENT = struct.Struct("=QQQQQLLLL")         # fe_logical, fe_physical, fe_length, 2 reserved, fe_flags, 3 reserved
BATCH = 512                                  # extents asked per ioctl
LAST = 0x1
UNWRITTEN = 0x800
VOUCHED = LAST | UNWRITTEN | 0x1000 | 0x2000   # LAST, UNWRITTEN, MERGED, SHARED: the location is known
Segment = tuple[int, int, int, bool]          # (offset in the block, physical address, length, unwritten)


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    unwritten: bool
    vouched: bool      # FIEMAP knows where it is, and that it is what the file reads there


def extents(fd: int) -> list[Extent]:
    """Every extent of an open regular file, in order of logical offset."""
    found: list[Extent] = []
    start = 0
    while True:
        request = bytearray(HEADER.size + BATCH * EXTENT.size)
        HEADER.pack_into(request, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC if not found else 0, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = HEADER.unpack_from(request)[3]
        last = False
        for n in range(mapped):
            logical, physical, length, _r1, _r2, flags, *_ = EXTENT.unpack_from(request, HEADER.size + n * EXTENT.size)
            found.append(Extent(logical, physical, length, bool(flags & UNWRITTEN), not flags & ~VOUCHED))
            last = last or bool(flags & LAST)
        if last or mapped == 0:
            return found
        start = found[-1].logical + found[-1].length


class ExtentMap:
    """The extents of one file, asked by byte range."""

    def __init__(self, found: list[Extent]):
        self._extents = found
        self._starts = [e.logical for e in found]

    def ordered(self) -> bool:
        """Extents in logical order, none overlapping the next: holes are told by what is left out."""
        return all(a.logical + a.length <= b.logical for a, b in zip(self._extents, self._extents[1:]))

    def segments(self, start: int, end: int) -> list[Segment] | None:
        """What the range [start, end) maps to (holes left out), or None where FIEMAP does not vouch."""
        out: list[Segment] = []
        for at in range(max(bisect.bisect_right(self._starts, start) - 1, 0), len(self._extents)):
            extent = self._extents[at]
            if extent.logical >= end:
                break
            lo, hi = max(start, extent.logical), min(end, extent.logical + extent.length)
            if lo >= hi:
                continue
            if not extent.vouched:
                return None
            out.append((lo - start, extent.physical + lo - extent.logical, hi - lo, extent.unwritten))
        return out


def unchanged_blocks(old: Path, new_fd: int, old_size: int, new_size: int, block_size: int) -> bytearray | None:
    """One flag per block of the new snapshot (open as new_fd), 1 where the block is that of the old snapshot
    at old (a byte per block: 2 MiB for a 2 TiB disk, where a set of indexes took a hundred times that);
    None when the two cannot be compared (not both regular files on one filesystem, no FIEMAP)."""
    try:
        old_fd = os.open(old, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        old_st, new_st = os.fstat(old_fd), os.fstat(new_fd)
        if old_st.st_dev != new_st.st_dev or old_st.st_ino == new_st.st_ino:
            return None
        before, after = ExtentMap(extents(old_fd)), ExtentMap(extents(new_fd))
    except OSError:   # a filesystem without FIEMAP: every block is read
        return None
    finally:
        os.close(old_fd)
    if not (before.ordered() and after.ordered()):   # not what FIEMAP promises: trust none of it
        return None
    same = bytearray(-(-new_size // block_size))
    common = min(old_size, new_size)
    for index in range(common // block_size):   # whole blocks both sizes cover (a cut-off last block is read)
        start = index * block_size
        segments = after.segments(start, start + block_size)
        if segments is not None and segments == before.segments(start, start + block_size):
            same[index] = 1
    if old_size == new_size and common % block_size:   # the same short last block
        index, start = common // block_size, common - common % block_size
        segments = after.segments(start, common)
        if segments is not None and segments == before.segments(start, common):
            same[index] = 1
    return same
