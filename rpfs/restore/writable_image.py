"""The writable image behind an instant restore: a target file filled from a recovery point while in use.

The copy is written to `PATH.rpfs-partial` (restore/partial.py), created sparse at the disk's size, with
a state file beside it (`PATH.rpfs-instant`): a JSON header naming the store, VM, recovery point and
disk, then a bitmap with one bit per block. A set bit means PATH holds that block (copied from the
store, or written by the user); reads of the other blocks come from the store. A background hydrator
copies the missing blocks.
When every bit is set the copy is renamed to PATH and the state file deleted: PATH is then a plain
standalone image, and PATH never holds a half-copied one.

Durability, so that neither a killed process nor a crash loses an acknowledged write:
- a block's data is written to PATH and fdatasync'ed *before* its bit is set, so a set bit always
  describes data on disk;
- a user's first write to a block merges it with the block's data from the store, writes the whole
  block, syncs, sets the bit, and only then returns;
- the bitmap is written with pwrite at once (it survives the process), and fsync'ed on the user's
  fsync and at completion (it survives the machine).
A bit that was lost only makes the hydrator copy that block again, which is harmless for blocks
nobody wrote: the store still holds them.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from rpfs.errors import RpfsError
from rpfs.host.files import fsync_folder, write_whole
from rpfs.host.threads import in_order
from rpfs.restore.partial import PartialFile, open_existing, state_path
from rpfs.serve.image import BlockCache, ImageReader
from rpfs.store.recovery_point import HOLE
from rpfs.store.source import RecoverySource

HEADER_SIZE = 4096
SYNC_EVERY_BYTES = 64 << 20    # the hydrator syncs data, then records bits, about this often


@dataclass
class InstantSource:
    """What an instant restore copies from; the JSON header of the state file."""
    store: str
    vm: str
    point_id: str
    disk: str
    size: int
    block_size: int
    vault: str = ""   # the vault's name when the copy comes from a vault (store is "" then)

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)


def read_source(target: Path) -> InstantSource:
    """The header of an unfinished instant restore's state file."""
    fd = open_existing(state_path(target), os.O_RDONLY)   # never through a link
    if fd is None:
        raise RpfsError(f"{target} has no unfinished instant restore")
    try:
        header = os.pread(fd, HEADER_SIZE, 0).rstrip(b"\0")
        source = InstantSource(**json.loads(header))
    except (ValueError, TypeError, UnicodeDecodeError):
        source = None
    finally:
        os.close(fd)
    fields_ok = source is not None and all(isinstance(getattr(source, k), str)
                                           for k in ("store", "vm", "point_id", "disk", "vault"))
    if not fields_ok or not all(type(v) is int and v > 0 for v in (source.size, source.block_size)):
        raise RpfsError(f"{state_path(target)} is damaged; it is not an rpfs instant-restore state file")
    return source


def unfinished_source(target: Path) -> InstantSource | None:
    """The header of target's unfinished instant restore, or None when there is none."""
    try:
        return read_source(target)
    except RpfsError:
        if state_path(target).exists():
            raise   # a damaged state file: say so
        return None


def progress_of(target: Path) -> tuple[int, int]:
    """(blocks copied, blocks in all) from the state file, readable whether or not a daemon runs."""
    source = read_source(target)
    fd = open_existing(state_path(target), os.O_RDONLY)
    if fd is None:
        raise RpfsError(f"{target} has no unfinished instant restore")
    try:
        bitmap = os.pread(fd, -(-source.blocks // 8), HEADER_SIZE)
    finally:
        os.close(fd)
    return sum(bin(b).count("1") for b in bitmap), source.blocks


def create(target: Path, source: InstantSource) -> None:
    """Start a new instant restore: a sparse partial file and a state file with no block copied yet."""
    if target.exists() or target.is_symlink():
        raise RpfsError(f"{target} already exists; choose a new path (or resume with the same VM, recovery"
                        " point and disk if it is an unfinished instant restore)")
    if not target.parent.is_dir():
        raise RpfsError(f"folder {target.parent} does not exist")
    partial = PartialFile.create(target)
    state = state_path(target)
    try:
        os.ftruncate(partial.fd, source.size)
        os.fsync(partial.fd)
        fsync_folder(target.parent)   # the partial file before the state file that names it
        header = json.dumps(asdict(source)).encode().ljust(HEADER_SIZE, b"\0")
        write_whole(state, header + bytes(-(-source.blocks // 8)), durable=True)
    except BaseException:
        state.unlink(missing_ok=True)   # first: a state file must never outlive its partial file
        partial.discard()
        raise
    partial.close()


class WritableImage:
    """PATH as the user sees it: blocks from PATH where its bit is set, from the store elsewhere."""

    def __init__(self, target: Path, store: RecoverySource, cache: BlockCache,
                 on_complete: Callable[[], None] = lambda: None):
        """on_complete runs once PATH is whole, before the state file goes: the store is not needed any more."""
        self.target, self.on_complete = target, on_complete
        self.source = read_source(target)
        point = store.point(self.source.vm, self.source.point_id)
        self.reader = ImageReader(store, cache, point.vm, point.id, point.disk(self.source.disk))
        self.size, self.block_size = self.source.size, self.source.block_size
        if self.reader.size != self.size or self.reader.block_size != self.block_size:
            raise RpfsError(f"{state_path(target)} does not match recovery point {point.vm}/{point.id}")
        # One server per target (the partial file's flock): two in-memory bitmaps would overwrite each
        # other's blocks.
        self._partial = PartialFile.resume(target)
        self._fd = self._partial.fd
        try:
            self._state_fd = os.open(state_path(target), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            self._partial.close()
            raise RpfsError(f"cannot open {state_path(target)}: {e.strerror}") from None
        self._bitmap = bytearray(os.pread(self._state_fd, -(-self.source.blocks // 8), HEADER_SIZE))
        self._lock = threading.Lock()     # block state changes: hydrator versus user writes
        self.complete = False
        self._finish_if_complete()

    def close(self) -> None:
        self._partial.close()
        if self._state_fd >= 0:
            os.close(self._state_fd)
        self._fd = self._state_fd = -1

    # -- block state -------------------------------------------------------------------------------
    def present(self, index: int) -> bool:
        return self.complete or bool(self._bitmap[index >> 3] & (1 << (index & 7)))

    def _mark(self, indexes: list[int]) -> None:
        """Set bits for blocks whose data is already synced to PATH, and write the bitmap bytes."""
        if not indexes:
            return
        for i in indexes:
            self._bitmap[i >> 3] |= 1 << (i & 7)
        first, last = min(indexes) >> 3, max(indexes) >> 3
        os.pwrite(self._state_fd, bytes(self._bitmap[first:last + 1]), HEADER_SIZE + first)

    def _finish_if_complete(self) -> None:
        if self.complete or any(b != 0xFF for b in self._bitmap[:self.source.blocks // 8]):
            return
        tail = self.source.blocks % 8
        if tail and self._bitmap[-1] != (1 << tail) - 1:
            return
        self._partial.finish()
        self.on_complete()
        state_path(self.target).unlink(missing_ok=True)   # a kill before this line: partial.settle
        os.close(self._state_fd)
        self._state_fd = -1
        self.complete = True

    # -- what the user does ------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        parts, pos = [], offset
        while pos < end:
            index = pos // self.block_size
            stop = min(end, (index + 1) * self.block_size)
            if self.present(index):
                parts.append(os.pread(self._fd, stop - pos, pos))
            else:
                parts.append(self.reader.read(pos, stop - pos))
            pos = stop
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> int:
        end = min(offset + len(data), self.size)
        if offset >= self.size and data:
            raise RpfsError("write beyond the end of the disk")
        view, pos = memoryview(data), offset
        while pos < end:
            index = pos // self.block_size
            stop = min(end, (index + 1) * self.block_size)
            piece = view[pos - offset:stop - offset]
            if self.present(index):
                os.pwrite(self._fd, piece, pos)
            else:
                self._first_write(index, pos, piece)
            pos = stop
        return end - offset

    def _first_write(self, index: int, pos: int, piece: memoryview) -> None:
        with self._lock:
            if self.present(index):   # the hydrator got there first
                os.pwrite(self._fd, piece, pos)
                return
            block_start = index * self.block_size
            block = self.reader.load(index)
            length = min(self.block_size, self.size - block_start)
            merged = bytearray(length) if block is HOLE else bytearray(block)
            merged[pos - block_start:pos - block_start + len(piece)] = piece
            os.pwrite(self._fd, merged, block_start)
            os.fdatasync(self._fd)
            self._mark([index])
            self._finish_if_complete()

    def fsync(self) -> None:
        with self._lock:   # completion closes the state file
            os.fdatasync(self._fd)
            if self._state_fd >= 0:
                os.fsync(self._state_fd)

    # -- the background copy -----------------------------------------------------------------------
    def hydrate(self, stop: threading.Event, bytes_per_second: float = 0) -> None:
        """Copy every block PATH lacks; returns when complete or when stop is set. bytes_per_second (0: no
        limit) spares the disk of a VM that runs on the image meanwhile."""
        pending: list[int] = []
        pending_bytes = copied = 0
        started = time.monotonic()
        missing = (index for index in range(self.source.blocks) if not self.present(index))
        workers = self.reader.store.parallel_reads or 1   # a vault: many GETs at once
        for index, block in in_order(self.reader.load, missing, workers, ahead=4 * workers):   # outside the lock
            if bytes_per_second and stop.wait(max(0.0, copied / bytes_per_second - (time.monotonic() - started))):
                break
            if stop.is_set():
                break
            with self._lock:
                if self.present(index):
                    continue
                if block is not HOLE:             # PATH is sparse: a hole needs no write
                    os.pwrite(self._fd, block, index * self.block_size)
                    pending_bytes += len(block)
                    copied += len(block)
                pending.append(index)
                if pending_bytes >= SYNC_EVERY_BYTES or len(pending) >= 4096:
                    self._commit(pending)
                    pending, pending_bytes = [], 0
        with self._lock:
            self._commit(pending)
            self._finish_if_complete()

    def _commit(self, indexes: list[int]) -> None:
        if indexes:
            os.fdatasync(self._fd)
            self._mark(indexes)
