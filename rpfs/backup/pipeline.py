"""Backup: read every disk of a VM as blocks, store the new ones, then record the recovery point.

Pipeline (one main thread, a pool of worker threads; BLAKE3, zstd and pread release the GIL):
  workers:  a task of TASK_BLOCKS blocks, each: read -> block id (BLAKE3, keyed when encrypted) -> zero
            check -> claimed (the first of its id in this backup, and the store lacks it) -> compress +
            seal (when encrypted) + frame
  main:     takes finished tasks in the order they finish: block maps, counters, batches of new blobs
  writer:   commits full batches of blobs in LMDB write transactions, on a thread of its own so that
            reading and compressing go on during the fsync
  main:     the last transaction commits the remaining blobs and records the recovery point.
A block crosses threads once per task, not four times (read, dedup, compress, batch): each hand-off could
wait for a sleeping core to wake, and a backup took longer than borg's single thread (docs/dev/benchmarks.md).
Blocks of all disks are interleaved, so disks are backed up in parallel. Blocks committed by a backup
that is then interrupted are harmless: no recovery point refers to them yet.

Change tracking: when the previous recovery point kept its reflink snapshot of a disk and this backup
took a new one, the blocks whose extents the two share (backup/extents.py) are not read at all: their
ids are the previous point's. The disk's record says which way it went ("extents" or "checksum") and
how many bytes were read.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from rpfs.backup import consistency, extents, snapshot
from rpfs.backup.quiesce import ConsistencyConfig
from rpfs.backup.source import BufferPool, DiskSource
from rpfs.errors import RpfsError
from rpfs.host import libc
from rpfs.store.recovery_point import (
    DIGEST_SIZE,
    HOLE,
    DiskRecord,
    KeptSnapshot,
    RecoveryPoint,
    check_name,
    new_point_id,
)
from rpfs.store.store import WRITER_WAIT_SECONDS, Store

BATCH_BYTES = 8 << 20           # commit stored blocks in transactions of about this size: up to three are in
                                # memory (filling, queued, committing). Measured on the 2 GiB bench image:
                                # 8 MiB 4.4-7.1 s and 81-90 MiB anonymous, 32 MiB 5.1-7.4 s and 172-210 MiB
                                # (a shorter flush holds the disk's reads up less); 64 MiB took 310 MiB
WINDOW_BYTES = 64 << 20         # at most about this much block data is in flight
TASK_BLOCKS = 4                 # blocks per worker task
MAX_KEEP_DAYS = 36500
ProgressFn = Callable[[int, int], None]


@dataclass
class BackupSummary:
    vm: str
    point_id: str
    disks: int
    bytes_read: int          # logical bytes covered (holes included)
    new_bytes: int           # raw bytes of blocks the store lacked
    deduplicated_bytes: int  # raw bytes of blocks the store already had
    zero_bytes: int          # bytes of all-zero blocks, recorded as holes
    stored_bytes: int        # bytes added to the store after compression and framing
    seconds: float
    unchanged_bytes: int = 0  # bytes of blocks change tracking found unchanged: not read at all
    disk_bytes_read: int = 0  # bytes really read from the disks
    notes: list[str] = field(default_factory=list)   # what went wrong after the point was safe (one line each)

    @property
    def mib_per_second(self) -> float:
        """Bytes really read from the disks per second (holes and unchanged blocks are not read)."""
        return self.disk_bytes_read / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def parse_disk_specs(specs: list[str]) -> list[tuple[str, str]]:
    disks, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RpfsError(f"--disk {spec!r}: expected NAME=PATH, e.g. --disk os=/var/lib/vms/web01.img")
        check_name("disk", name)
        if name in seen:
            raise RpfsError(f"disk name {name!r} given twice")
        seen.add(name)
        disks.append((name, path))
    if not disks:
        raise RpfsError("give at least one --disk NAME=PATH")
    return disks


@dataclass
class BackupOptions:
    consistency: ConsistencyConfig | None = None   # pre/post scripts and filesystems to freeze
    allow_live: bool = False          # read a disk in use that cannot be snapshotted (inconsistent)
    keep_snapshot_days: float = 0.0   # keep the newest snapshot this long (the instant-restore tier)


def backup(store: Store, vm: str, disk_specs: list[tuple[str, str]], progress: ProgressFn | None = None,
           workers: int | None = None, options: BackupOptions | None = None,
           started: Callable[[], None] | None = None) -> tuple[RecoveryPoint, BackupSummary]:
    """Quiesce and snapshot, thaw, read the snapshots, commit the recovery point, then drop the snapshots.
    started() is called once every check passed and the work starts (the CLI records the job then)."""
    check_name("VM", vm)
    options = options or BackupOptions()
    if not 0 <= options.keep_snapshot_days <= MAX_KEEP_DAYS:   # also refuses nan
        raise RpfsError(f"keep the snapshot between 0 and {MAX_KEEP_DAYS} days")
    disks = {name: Path(os.path.abspath(path)) for name, path in disk_specs}
    for name, path in disks.items():   # every disk readable before anything is quiesced
        DiskSource.open(name, path).close()
    with store.writer_lock(f"backup of {vm}", wait_seconds=WRITER_WAIT_SECONDS, refuse=_another_backup):
        if started:
            started()
        kept = {Path(p) for point in store.points(vm) if point.snapshot for p in point.snapshot.paths.values()}
        snapshot.delete(snapshot.orphans(disks.values(), vm, kept))   # under the writer lock: none is in the making
        when = datetime.now(timezone.utc)
        point_id = new_point_id(when, {p.id for p in store.points(vm)} | store.last_point_ids(vm))
        prepared = consistency.prepare(vm, disks, point_id, options.consistency, options.allow_live)
        sources: list[DiskSource] = []
        try:
            for name, path in prepared.read_from.items():
                sources.append(DiskSource.open(name, path, shown_as=disks[name]))
            tracked = _tracked_changes(store, vm, sources, set(prepared.snapshots))
            point, summary = _run(store, RecoveryPoint(vm=vm, id=point_id, time=when.isoformat(timespec="seconds"),
                                                       consistency=prepared.consistency, quiesce=prepared.record),
                                  sources, progress, workers or (os.cpu_count() or 2) + 1, tracked)
            _keep_or_delete_snapshots(store, point, prepared.snapshots, options.keep_snapshot_days)
        except BaseException as e:
            # Asked of the store, not of a flag: an interrupt may land just after the commit.
            committed = store.has_point(vm, point_id)
            if not committed or store.point(vm, point_id).snapshot is None:
                snapshot.delete(prepared.snapshots.values())   # a snapshot nothing records must not stay
            if committed and isinstance(e, KeyboardInterrupt):
                e.recovery_point = f"{vm}/{point_id}"   # for the CLI's last line
            raise
        finally:
            for s in sources:
                s.close()
    return point, summary


@dataclass
class TrackedChanges:
    """What change tracking found for one disk: the previous point's block map, and the blocks unchanged."""
    previous_map: bytes
    unchanged: bytearray   # 1 for each block not to be read
    how: str = "extents"   # the disk record's change_tracking: extents (FIEMAP) or dirty-bitmap (QEMU)


def _tracked_changes(store: Store, vm: str, sources: list[DiskSource],
                     snapshotted: set[str]) -> dict[str, TrackedChanges]:
    """Per disk read from a new snapshot, the blocks it shares with the kept snapshot of the VM's latest
    point that kept one (and whose disk it still exactly is); disks without one are read whole."""
    previous = next((p for p in reversed(store.points(vm)) if p.snapshot), None)
    found: dict[str, TrackedChanges] = {}
    for source in sources:
        if previous is None or source.name not in snapshotted:
            continue
        disk = next((d for d in previous.disks if d.name == source.name), None)
        if disk is None or disk.block_size != store.block_size:
            continue
        old = previous.snapshot.unchanged(disk.name, disk.size)
        same = extents.unchanged_blocks(old, source.fd, disk.size, source.size, store.block_size) if old else None
        if same is None:
            continue
        try:
            previous_map = store.block_map(store.map_key(vm, previous.id, disk.name))
        except RpfsError:   # a damaged map: this disk is read whole, as without change tracking
            continue
        if len(previous_map) == disk.blocks * DIGEST_SIZE:
            found[source.name] = TrackedChanges(previous_map, same)
    return found


def _another_backup(holder: str) -> str | None:
    """Two backups never wait for each other (one is surely a mistake); prune or gc is waited for."""
    return f"the store is busy: {holder} is writing to it" if holder.startswith("backup of ") else None


def _keep_or_delete_snapshots(store: Store, point: RecoveryPoint, snapshots: dict[str, Path], days: float) -> None:
    """Keep the newest snapshot for `days`, or delete it now; older kept snapshots of the VM go when a
    newer one is kept or when their time is up."""
    now = datetime.now(timezone.utc)
    if snapshots and days > 0:
        keep_until = (now + timedelta(days=days)).isoformat(timespec="seconds")
        kept = KeptSnapshot(paths={name: str(p) for name, p in snapshots.items()}, keep_until=keep_until,
                            stamps={name: [p.stat().st_size, p.stat().st_mtime_ns] for name, p in snapshots.items()})
        store.modify_point(point.vm, point.id, lambda p: setattr(p, "snapshot", kept))
        point.snapshot = kept
    else:
        snapshot.delete(snapshots.values())
    for older in store.points(point.vm):
        if older.id == point.id or not older.snapshot:
            continue
        if (snapshots and days > 0) or older.snapshot.expired(now):
            snapshot.delete(older.snapshot.paths.values())
            store.modify_point(older.vm, older.id, lambda p: setattr(p, "snapshot", None))


class _BatchWriter:
    """Commits batches of blobs on its own thread; one batch is written while at most one waits.
    committed(batch) is called on that thread once a batch is in the store."""

    def __init__(self, store: Store, committed: Callable[[dict[bytes, bytes]], None]):
        self.store, self._committed = store, committed
        self._queue: queue.Queue[dict[bytes, bytes] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rpfs-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: dict[bytes, bytes]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def finish(self) -> None:
        """Wait until every batch is committed; raise the error of a failed commit."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self.store.put_blobs(batch)
                    self._committed(batch)
            except BaseException as e:  # handed to the main thread, which stops the backup
                self._error = e


class _BackupRun:
    """The state of one backup while it runs: block maps, counters, and the blocks in flight."""

    def __init__(self, store: Store, sources: list[DiskSource], workers: int,
                 tracked: dict[str, TrackedChanges] | None = None):
        self.store, self.sources, self.workers = store, sources, workers
        self.bs = store.block_size
        self.maps = [bytearray(s.block_count(self.bs) * DIGEST_SIZE) for s in sources]
        self.referenced: list[set[bytes]] = [set() for _ in sources]
        self.counts = dict(read=0, new=0, dedup=0, zero=0, stored=0, unchanged=0)
        self.tracked = [(tracked or {}).get(s.name) for s in sources]
        self.records = [DiskRecord(name=s.name, size=s.size, block_size=self.bs, blocks=s.block_count(self.bs),
                                   source=str(s.path), change_tracking=t.how if t else "checksum")
                        for s, t in zip(sources, self.tracked)]
        self.batch: dict[bytes, bytes] = {}          # framed blobs awaiting their write transaction
        self.batch_bytes = 0
        self.claimed: set[bytes] = set()              # ids of new blocks this backup stores, until committed
        self._claim_lock = threading.Lock()
        self.buffers = BufferPool(self.bs)
        self.writer = _BatchWriter(store, committed=self.forget)
        self.finished: queue.SimpleQueue[tuple[list | None, BaseException | None]] = queue.SimpleQueue()
        # Tasks in flight: enough to keep every worker busy, bounded in bytes for large blocks.
        self.window = max(2, min(2 * workers, WINDOW_BYTES // (self.bs * TASK_BLOCKS)))

    def blocks_in_parallel(self):
        """(disk, block index) round-robin over disks, so that all disks are read in parallel."""
        counts = [s.block_count(self.bs) for s in self.sources]
        for index in range(max(counts, default=0)):
            for d, count in enumerate(counts):
                if index < count:
                    yield d, index

    def run(self, pool: ThreadPoolExecutor, progress: ProgressFn | None) -> None:
        total = sum(s.size for s in self.sources)
        in_flight, task = 0, []
        for d, index in self.blocks_in_parallel():
            tracked = self.tracked[d]
            if tracked is not None and tracked.unchanged[index]:
                self.take_unchanged(d, index, tracked.previous_map[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE])
                continue
            task.append((d, index))
            if len(task) == TASK_BLOCKS:
                pool.submit(self.work, task)
                in_flight, task = in_flight + 1, []
                while in_flight >= self.window:
                    self.take(*self.finished.get())
                    in_flight -= 1
                    if progress:
                        progress(self.counts["read"], total)
        if task:
            pool.submit(self.work, task)
            in_flight += 1
        while in_flight:
            self.take(*self.finished.get())
            in_flight -= 1
        if progress:
            progress(self.counts["read"], total)

    def work(self, task: list[tuple[int, int]]) -> None:
        """On a worker thread: each block of the task read, identified, and encoded if this backup stores
        it; the results, or what went wrong, handed to the main thread."""
        try:
            self.finished.put(([self.process(d, index) for d, index in task], None))
        except BaseException as e:   # raised again on the main thread, which stops the backup
            self.finished.put((None, e))

    def process(self, d: int, index: int) -> tuple[int, int, bytes, bytearray | None]:
        """(disk, index, block id, blob): the blob only for a block this backup stores."""
        digest, data = self.sources[d].read_block(index, self.bs, self.buffers, self.store.codec)
        if data is None:
            return d, index, digest, None
        try:
            return d, index, digest, self.store.codec.encode(digest, data) if self.claim(digest) else None
        finally:
            self.buffers.give(data)

    def claim(self, digest: bytes) -> bool:
        """True for the first block of this id in this backup if the store lacks it: its blob is stored.
        A claimed id is never stored twice: later blocks of it are deduplicated while its blob is encoded,
        waits in a batch or is being written (claimed), and once it is in the store (has_block). Only ids
        in flight are kept: a full read of a large disk would otherwise hold every id twice."""
        with self._claim_lock:
            if digest in self.claimed:
                return False
            self.claimed.add(digest)
        if self.store.has_block(digest):
            self.forget((digest,))
            return False
        return True

    def forget(self, digests) -> None:
        """Ids the store now has (a committed batch), or had already: has_block answers for them."""
        with self._claim_lock:
            self.claimed.difference_update(digests)

    def record(self, d: int, index: int, digest: bytes) -> int:
        """Put a block's id in its disk's map and count it; returns its length, or 0 for a hole."""
        length = min(self.bs, self.sources[d].size - index * self.bs)
        self.counts["read"] += length
        self.maps[d][index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = digest
        if digest == HOLE:
            self.counts["zero"] += length
            self.records[d].zero_blocks += 1
            return 0
        self.referenced[d].add(digest)
        return length

    def take_unchanged(self, d: int, index: int, digest: bytes) -> None:
        """A block change tracking vouches for: the previous point's id, nothing read."""
        self.counts["unchanged"] += self.record(d, index, digest)

    def take(self, results: list | None, error: BaseException | None) -> None:
        """Record a finished task's blocks in their disks' maps; its new blobs go to the batch."""
        if error is not None:
            raise error
        for d, index, digest, blob in results:
            length = self.record(d, index, digest)
            if not length:
                continue
            if blob is None:
                self.counts["dedup"] += length
                continue
            self.counts["new"] += length
            self.records[d].new_blocks += 1
            self.records[d].new_stored_bytes += len(blob)
            self.batch[digest] = blob
            self.batch_bytes += len(blob)
            self.counts["stored"] += len(blob)
            if self.batch_bytes >= BATCH_BYTES:
                self.writer.submit(self.batch)
                self.batch, self.batch_bytes = {}, 0

    def commit(self, point: RecoveryPoint) -> None:
        """The last transaction: the remaining blobs and the recovery point, visible from now on."""
        self.store.put_blobs(self.batch, point, {s.name: bytes(m) for s, m in zip(self.sources, self.maps)})

    def stored_bytes_of(self, digests: set[bytes]) -> int:
        """Compressed bytes of distinct blocks: from the last batch or the store (the writer is done)."""
        in_batch = [len(self.batch[d]) for d in digests if d in self.batch]
        return sum(in_batch) + self.store.blob_lengths(d for d in digests if d not in self.batch)


def _run(store: Store, point: RecoveryPoint, sources: list[DiskSource], progress: ProgressFn | None,
         workers: int, tracked: dict[str, TrackedChanges] | None = None,
         checksum_reasons: dict[str, str] | None = None) -> tuple[RecoveryPoint, BackupSummary]:
    """Transfer: read every source (but what change tracking vouches for), store the new blocks, and commit
    `point` with its block maps. checksum_reasons: per disk, why it was read whole if it was (its record says)."""
    started = time.monotonic()
    if store.block_size <= libc.MMAP_THRESHOLD_MAX // 2:   # a blob and LMDB's copy of it: a block and a bit
        libc.reuse_freed_memory(2 * store.block_size, keep_free=BATCH_BYTES)
    run = _BackupRun(store, sources, workers, tracked)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpfs-backup") as pool:
        try:
            run.run(pool, progress)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            run.writer.finish()
            raise
    run.writer.finish()
    for record, refs, source in zip(run.records, run.referenced, sources):
        record.stored_bytes = run.stored_bytes_of(refs)
        record.read_bytes = source.bytes_read
        if record.change_tracking == "checksum":
            record.change_tracking_reason = (checksum_reasons or {}).get(record.name, "")
    c = run.counts
    point.disks = run.records
    point.duration_seconds = round(time.monotonic() - started, 3)
    run.commit(point)
    summary = BackupSummary(vm=point.vm, point_id=point.id, disks=len(sources), bytes_read=c["read"],
                            new_bytes=c["new"], deduplicated_bytes=c["dedup"], zero_bytes=c["zero"],
                            stored_bytes=c["stored"], seconds=time.monotonic() - started,
                            unchanged_bytes=c["unchanged"], disk_bytes_read=sum(s.bytes_read for s in sources))
    return point, summary
