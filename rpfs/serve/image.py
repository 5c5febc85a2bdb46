"""Random-access reads of one disk of a recovery point: the one path from a block map to bytes.

The FUSE mount and the full restore both read through ImageReader, from any RecoverySource (a store, its
reader processes or a vault: store/source.py). Holes read as zeros without touching
the store; stored blocks are decoded, each frame checked (blob.py), and kept in a BlockCache shared by
all images, bounded in bytes, so memory does not grow with disk size. A random read decodes only the
frames it needs and caches nothing (read_frames): a whole block would cost 16 times as much.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Callable

from rpfs.errors import CorruptBlockError
from rpfs.host.libc import give_back_freed_memory
from rpfs.store.recovery_point import HOLE, DiskRecord
from rpfs.store.source import RecoverySource

DEFAULT_CACHE_BYTES = 256 << 20
SHARED_ZEROS = 1 << 20   # the largest FUSE request (max_pages): holes up to this size read one shared buffer
TRIM_EVERY = 32 << 20   # evicted bytes between two give_back_freed_memory: 10-40 MiB less at 256 MiB


class BlockCache:
    """An LRU of decoded, verified blocks by digest, bounded by total bytes. Thread-safe. give_back: hand
    evicted blocks' memory back to the system (a daemon); a batch command reuses it instead."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, give_back: bool = True):
        self.max_bytes, self.give_back = max_bytes, give_back
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = self._evicted = 0
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            data = self._blocks.get(digest)
            if data is not None:
                self._blocks.move_to_end(digest)
            return data

    def put(self, digest: bytes, data: bytes) -> None:
        with self._lock:
            if digest in self._blocks or len(data) > self.max_bytes:
                return
            self._blocks[digest] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= len(old)
                self._evicted += len(old)
            trim = self._evicted >= TRIM_EVERY and self.give_back
            if trim:
                self._evicted = 0
        if trim:
            del old
            give_back_freed_memory()   # the evicted blocks were freed in whichever thread's heap decoded them

    @property
    def size(self) -> int:
        return self._bytes


def load_block(store: RecoverySource, digest: bytes, length: int, start: int = 0, stop: int | None = None) -> bytes:
    """Fetch, decode and check bytes [start, stop) of one block of `length` bytes: wrong data never leaves
    this function."""
    try:
        part = None if (start, stop) == (0, None) else (start, stop)
        data = store.get_blob(digest, functools.partial(store.codec.read, digest, length=length, start=start,
                                                        stop=stop), part)
    except CorruptBlockError as e:
        raise CorruptBlockError(f"block {digest.hex()}: {e.message}") from None
    if data is None:
        raise CorruptBlockError(f"block {digest.hex()} is missing from the store")
    return data


class ImageReader:
    """read(offset, size) over one disk of one recovery point."""

    def __init__(self, store: RecoverySource, cache: BlockCache, vm: str, point_id: str, disk: DiskRecord):
        self.store, self.cache, self.disk = store, cache, disk
        self.size = disk.size
        self.block_count = disk.blocks
        self.block_size = disk.block_size
        self._map_key = store.map_key(vm, point_id, disk.name)
        self._last_digest: tuple[int, bytes] = (-1, b"")   # replaced whole, so safe across threads

    def _ranges(self, offset: int, size: int):
        """(block index, start within block, end within block) for each block the range touches."""
        end = min(offset + size, self.size)
        bs = self.block_size
        pos = max(offset, 0)
        while pos < end:
            index, start = divmod(pos, bs)
            stop = min(bs, start + (end - pos))
            yield index, start, stop
            pos += stop - start

    def blocks(self, offset: int, size: int) -> range:
        """Indexes of the blocks that a read of [offset, offset+size) touches."""
        end = min(offset + size, self.size)
        if end <= offset:
            return range(0)
        return range(offset // self.block_size, (end - 1) // self.block_size + 1)

    def block_length(self, index: int) -> int:
        """Bytes of block index: a whole block but for a shorter last one."""
        return min(self.block_size, self.size - index * self.block_size)

    def digest(self, index: int) -> bytes:
        """The digest of block index; the last one looked up is remembered (sequential reads ask again)."""
        last_index, last_digest = self._last_digest
        if last_index == index:
            return last_digest
        digest = self.store.block_digest(self._map_key, index)
        self._last_digest = (index, digest)
        return digest

    def load(self, index: int) -> bytes:
        """Decode, verify and cache one block (HOLE for a hole); the slow part of a read, for a thread."""
        digest = self.digest(index)
        if digest == HOLE:
            return HOLE
        data = self.cache.get(digest)
        if data is None:
            data = load_block(self.store, digest, self.block_length(index))
            self.cache.put(digest, data)
        return data

    def peek(self, index: int) -> bytes | None:
        """A block's data if it costs nothing (HOLE for a hole, or cached), else None."""
        digest = self.digest(index)
        return HOLE if digest == HOLE else self.cache.get(digest)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at [offset, offset+size), short at the end of the disk. Raises CorruptBlockError."""
        return bytes(self._read(offset, size, lambda index, start, stop: _part(self.load(index), start, stop)))

    def read_cached(self, offset: int, size: int) -> bytes | memoryview | None:
        """The same bytes if every block is a hole or cached (cheap enough to serve inline), else None; a
        view, not a copy, of a single cached block or of zeros (FUSE copies it to the kernel anyway)."""
        return self._read(offset, size, lambda index, start, stop: _part(self.peek(index), start, stop))

    def read_frames(self, offset: int, size: int) -> bytes | memoryview:
        """The same bytes, decoding only the frames of uncached blocks they lie in, caching nothing."""
        def part(index: int, start: int, stop: int) -> bytes:
            digest = self.digest(index)
            data = HOLE if digest == HOLE else self.cache.get(digest)
            if data is not None:
                return _part(data, start, stop)
            return load_block(self.store, digest, self.block_length(index), start, stop)
        return self._read(offset, size, part)

    def _read(self, offset: int, size: int,
              part: Callable[[int, int, int], bytes | memoryview | None]) -> bytes | memoryview | None:
        """Join part(block index, start, stop) over the blocks the range touches; None if a part is None."""
        parts = []
        for index, start, stop in self._ranges(offset, size):
            data = part(index, start, stop)
            if data is None:
                return None
            parts.append(data)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)


def _part(block: bytes | None, start: int, stop: int) -> bytes | memoryview | None:
    """Bytes [start, stop) of a block's data (zeros for HOLE), a view where a slice would copy; None stays
    None."""
    if block is None:
        return None
    if block is HOLE:
        size = stop - start
        return _zeros(1 << (size - 1).bit_length())[:size] if 0 < size <= SHARED_ZEROS else bytes(size)
    return block if (start, stop) == (0, len(block)) else memoryview(block)[start:stop]


@functools.lru_cache(maxsize=None)
def _zeros(size: int) -> memoryview:
    """size zero bytes (a power of two, at most SHARED_ZEROS), never written: one buffer for the replies of
    every hole instead of a fresh one each."""
    return memoryview(bytes(size))

