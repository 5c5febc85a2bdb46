"""Full restore: write a disk of a recovery point back to a file or a block device.

Blocks are decoded and checked (each frame, blob.py) on worker threads through the same ImageReader the mount uses, and
written in order by one thread. A recovery point whose reflink snapshot is still kept (the
instant-restore tier) is restored to a file on the same filesystem by cloning the snapshot instead.
A file target is written through the partial-file protocol (partial.py): as `<target>.rpfs-partial`,
renamed into place only once complete and synced, so an interrupted restore never leaves a half image
where the user expects a whole one; holes stay holes. A block device is written in place; its holes are
written as zeros, or zeroed by the device (BLKZEROOUT: unmapped where it guarantees zeros) with
discard=True.
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rpfs.backup import snapshot
from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place
from rpfs.host.disk_use import in_use
from rpfs.host.libc import punch_hole, reuse_freed_memory, start_writeback
from rpfs.host.threads import in_order
from rpfs.host.tools import run_tool_raw
from rpfs.restore.partial import PartialFile, check_free, refuse_link
from rpfs.serve.image import BlockCache, ImageReader
from rpfs.store.recovery_point import HOLE, RecoveryPoint
from rpfs.store.source import RecoverySource

BLKZEROOUT = 0x127F   # zero a range: by discard/write-zeroes where the device guarantees zeros
WRITEBACK_BYTES = 64 << 20   # written between two starts of writeback: the final fsync waits for little
REPEATS_BYTES = 64 << 20     # decoded blocks kept: one that repeats this close is fetched and decoded once
ProgressFn = Callable[[int, int], None]


@dataclass
class RestoreSummary:
    vm: str
    point_id: str
    disk: str
    target: str
    size: int
    written_bytes: int      # data blocks written
    hole_bytes: int         # holes: left sparse in a file, zeroed or discarded on a device
    seconds: float
    discarded_bytes: int = 0   # of the holes, on a device with --discard: freed, and read back as zeros
    zeroed_bytes: int = 0      # of the holes, on a device: zeros written (--discard: where it cannot free)

    @property
    def mib_per_second(self) -> float:
        """Image bytes (holes included) per second."""
        return self.size / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def check_target(target: Path, size: int, force: bool) -> bool:
    """Refuse a target that would lose data or cannot hold the disk, or in a place another user could
    prepare (a link of root's is let through for a device: /dev/disk/by-id/...); True for a block device."""
    check_trusted_place(target, "restore target")
    if target.is_block_device():
        device_size = _device_size(target)
        if device_size < size:
            raise RpfsError(f"{target} is too small: {device_size} bytes, the disk needs {size}")
        busy = in_use(target)
        if busy:
            raise RpfsError(f"{busy}: it is in use; stop using it first")
        found = _signature(target)
        if found and not force:
            raise RpfsError(f"{target} holds {found}; restoring over it destroys it (use --force to overwrite it)")
        return True
    refuse_link(target)   # renamed over, a link would be replaced; a dangling one was planted
    if target.exists():
        if target.is_dir():
            raise RpfsError(f"{target} is a directory; give a file or block device path")
        if not stat.S_ISREG(target.stat().st_mode):
            raise RpfsError(f"{target} is neither a regular file nor a block device")
        if not force:
            raise RpfsError(f"{target} already exists (use --force to replace it)")
        busy = in_use(target)
        if busy:
            raise RpfsError(f"{busy}: it is in use; stop using it first")
    if not target.parent.is_dir():
        raise RpfsError(f"folder {target.parent} does not exist")
    check_free(target)
    return False


def restore_disk(store: RecoverySource, point: RecoveryPoint, disk_name: str, target: Path, *,
                 force: bool = False, discard: bool = False, progress: ProgressFn | None = None,
                 workers: int | None = None, mode: int | None = None) -> RestoreSummary:
    disk = point.disk(disk_name)
    is_device = check_target(target, disk.size, force)
    reuse_freed_memory()   # a block decoded and written at a time: its buffers reused, not faulted in anew
    with store.keeper() as keeper:   # prune must not delete the recovery point while it is being copied
        keeper.take(point.vm, point.id)
        return _restore(store, point, disk, target, is_device, discard, progress, workers, mode)


def _restore(store: RecoverySource, point: RecoveryPoint, disk, target: Path, is_device: bool, discard: bool,
             progress: ProgressFn | None, workers: int | None, mode: int | None) -> RestoreSummary:
    disk_name = disk.name
    started = time.monotonic()
    # a vault fetched a repeated blob alone each time again (a ranged GET apiece: 162 for the bench image)
    reader = ImageReader(store, BlockCache(REPEATS_BYTES, give_back=False), point.vm, point.id, disk)
    holes = DeviceHoles(discard)
    if is_device:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)   # EBUSY while the device is mounted
        except OSError as e:
            raise RpfsError(f"cannot open {target} for writing: {e.strerror}") from None
        try:
            written = _restore_blocks(reader, fd, target, progress, workers, holes=holes)
        finally:
            os.close(fd)
    else:
        partial = PartialFile.create(target)
        try:
            if store.kept_snapshots and _clone_kept_snapshot(point, disk_name, disk.size, partial.fd):
                written = disk.size - disk.zero_blocks * disk.block_size   # about: the clone shares extents
                if progress:
                    progress(disk.size, disk.size)
            else:
                os.ftruncate(partial.fd, disk.size)   # a sparse file of the right size: holes are never written
                written = _restore_blocks(reader, partial.fd, partial.path, progress, workers, holes=None)
            if mode is not None:
                os.fchmod(partial.fd, mode)   # before it gets its name: never readable wider than asked
            partial.finish()
        except BaseException:
            partial.discard()
            raise
        partial.close()
    return RestoreSummary(vm=point.vm, point_id=point.id, disk=disk.name, target=str(target), size=disk.size,
                          written_bytes=written, hole_bytes=disk.size - written,
                          discarded_bytes=holes.discarded, zeroed_bytes=holes.zeroed,
                          seconds=time.monotonic() - started)


def _clone_kept_snapshot(point: RecoveryPoint, disk_name: str, size: int, fd: int) -> bool:
    """The instant-restore tier: a kept reflink snapshot on the target's filesystem is cloned in seconds."""
    kept = point.snapshot.unchanged(disk_name, size) if point.snapshot else None
    if kept is None:
        return False   # none, or changed since the backup read it: decode the store instead
    try:
        snapshot.clone_kept(kept, fd)
    except (snapshot.CannotSnapshot, FileNotFoundError):   # another filesystem, or expired just now
        return False
    except RpfsError:   # a snapshot folder that is not root's alone, or a link: the store has the blocks
        return False
    return True


def _restore_blocks(reader: ImageReader, fd: int, path: Path, progress: ProgressFn | None,
                    workers: int | None, holes: Callable[[int, int, int], None] | None) -> int:
    """Decode blocks on worker threads, write them in order to fd and sync; returns the data bytes written.
    Writeback is started every WRITEBACK_BYTES, so the disk writes while blocks decode."""
    workers = workers or reader.store.parallel_reads or (os.cpu_count() or 2)
    bs, size = reader.block_size, reader.size
    written = synced_to = 0

    try:
        for index, data in in_order(reader.load, range(reader.block_count), workers, ahead=4 * workers):
            written += _write_block(fd, bs, size, index, data, holes)
            end = min((index + 1) * bs, size)
            if end - synced_to >= WRITEBACK_BYTES:
                start_writeback(fd, synced_to, end - synced_to)
                synced_to = end
            if progress:
                progress(end, size)
        os.fsync(fd)
        if progress:
            progress(size, size)
    except OSError as e:
        raise RpfsError(f"writing {path} failed: {e.strerror}") from None
    return written


def _write_block(fd: int, bs: int, size: int, index: int, data: bytes, holes) -> int:
    offset = index * bs
    if data is HOLE:
        if holes is not None:
            holes(fd, offset, min(bs, size - offset))
        return 0
    os.pwrite(fd, data, offset)
    return len(data)


class DeviceHoles:
    """What a device gets where the disk has holes: zeros written; with discard, the range freed where the
    device guarantees it then reads back as zeros (fallocate PUNCH_HOLE: a loop device's backing file
    shrinks, a thin device frees it), zeros where it does not (BLKDISCARD alone guarantees nothing). Counts
    which was done, for the summary."""

    def __init__(self, discard: bool):
        self.discard, self.discarded, self.zeroed = discard, 0, 0

    def __call__(self, fd: int, offset: int, length: int) -> None:
        if self.discard:
            try:
                punch_hole(fd, offset, length)
                self.discarded += length
                return
            except OSError:
                self.discard = False   # the device cannot: zeros for the rest, without asking again
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))   # zeros, kept allocated
        except OSError:
            os.pwrite(fd, bytes(length), offset)
        self.zeroed += length


def _signature(device: Path) -> str | None:
    """What blkid finds on a device (a filesystem, a partition table...), as mkfs asks before writing."""
    probe = run_tool_raw(["blkid", "-p", "-o", "export", str(device)])
    if probe.returncode == 2:
        return None   # nothing found
    tags = dict(line.split("=", 1) for line in probe.stdout.splitlines() if "=" in line)
    if tags.get("PTTYPE"):
        return f"a {tags['PTTYPE']} partition table"
    if tags.get("TYPE"):
        return f"a {tags['TYPE']} filesystem" + (f" labelled {tags['LABEL']!r}" if tags.get("LABEL") else "")
    return "a signature blkid recognises (or one it cannot tell apart)"


def _device_size(device: Path) -> int:
    with open(device, "rb") as f:
        return f.seek(0, os.SEEK_END)
