"""Backing up a libvirt domain: every disk as the guest sees it, running or shut off.

Running: guest pre-scripts -> guest freeze -> libvirt's backup job begins (that is the snapshot: QEMU
serves each disk as it was at that moment over NBD, and starts a checkpoint named after the point) ->
thaw -> guest post-scripts -> transfer through the usual pipeline -> the point commits -> the job ends
and the checkpoints no point needs are deleted. An incremental reads only the extents QEMU's dirty
bitmap marks since the previous point's checkpoint; when that chain is broken (a missing or
inconsistent checkpoint, another domain under the same name, a disk replaced) every block is read and
hashed, the reason is on the disk's record, and a new chain starts.

Shut off: each image (raw, or qcow2 with its backing chain) is served read-only over NBD by
qemu-storage-daemon/qemu-nbd (vm/image_export.py) and read whole; the point's consistency is
`shut-off` (the disks as the guest left them).

The order of the steps, and why each disk's bytes are the guest's: docs/manual/virtual-machines.md.
"""
from __future__ import annotations

import fcntl
import os
import secrets
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from rpfs.backup.guest_consistency import guest_consistent
from rpfs.backup.nbd_source import NbdDiskSource
from rpfs.backup.pipeline import BackupSummary, ProgressFn, TrackedChanges, _another_backup, _run
from rpfs.backup.quiesce import ConsistencyConfig
from rpfs.errors import RpfsError
from rpfs.host import run_dir
from rpfs.store.recovery_point import DIGEST_SIZE, RecoveryPoint, check_name, new_point_id
from rpfs.store.store import WRITER_WAIT_SECONDS, Store
from rpfs.vm import backup_job, domain, image_export, libvirt_host

CONSISTENCY_ORDER = ("inconsistent", "crash", "file-system", "application", "shut-off")   # worst first


@dataclass
class VmBackupOptions:
    consistency: ConsistencyConfig | None = None    # guest scripts and freeze window
    exclude_disks: set[str] = field(default_factory=set)   # --exclude-disk: targets left out (each must exist)
    require: str | None = None                      # a minimum consistency: file-system or application
    temporary: set[str] = field(default_factory=set)   # a protection's temporary disks: left out while the
                                                       # domain has them (gone since: no error, unlike exclude)


def at_least(consistency: str, required: str | None) -> bool:
    """Is a point of this consistency good enough? shut-off counts as the best: nothing ran."""
    return required is None or CONSISTENCY_ORDER.index(consistency) >= CONSISTENCY_ORDER.index(required)


def backup_domain(store: Store, vm: str, domain_name: str, progress: ProgressFn | None = None,
                  workers: int | None = None, options: VmBackupOptions | None = None,
                  started: Callable[[], None] | None = None) -> tuple[RecoveryPoint, BackupSummary]:
    """Back up every disk of a libvirt domain into a new recovery point of `vm`."""
    check_name("VM", vm)
    options = options or VmBackupOptions()
    conn = libvirt_host.connect()
    dom = libvirt_host.lookup(conn, domain_name)
    with _domain_lock(dom.UUIDString()), \
            store.writer_lock(f"backup of {vm}", wait_seconds=WRITER_WAIT_SECONDS, refuse=_another_backup):
        state, active = libvirt_host.state(dom), bool(dom.isActive())   # paused is active: qemu holds the disks
        xml = libvirt_host.domain_xml(dom, inactive=not active)
        temporary = options.temporary & {d.target for d in domain.disks(xml)}
        found = domain.discover(xml, options.exclude_disks | temporary)
        if not found.disks:
            why = "; ".join(f"{t}: {r}" for t, r in {**found.refused, **found.skipped}.items()) or "it has none"
            raise RpfsError(f"domain {domain_name} has no disk rpfs can back up ({why})")
        if started:
            started()
        when = datetime.now(timezone.utc)
        point_id = new_point_id(when, {p.id for p in store.points(vm)} | store.last_point_ids(vm))
        point = RecoveryPoint(vm=vm, id=point_id, time=when.isoformat(timespec="seconds"), libvirt={
            "domain": domain_name, "uuid": domain.uuid(xml), "state": state, "xml": xml,
            "skipped": found.skipped, "refused": found.refused})
        workers = workers or (os.cpu_count() or 2) + 1
        if active:
            return _backup_running(store, point, dom, found.disks, options, progress, workers)
        return _backup_shut_off(store, point, found.disks, options, progress, workers)


def _backup_running(store: Store, point: RecoveryPoint, dom, disks: list[domain.DomainDisk],
                    options: VmBackupOptions, progress: ProgressFn | None,
                    workers: int) -> tuple[RecoveryPoint, BackupSummary]:
    # The point's id and a random part: two stores back up one domain in the same second too.
    checkpoint = f"{backup_job.CHECKPOINT_PREFIX}{point.id}-{secrets.token_hex(4)}"
    previous = _previous_point(store, point.vm)
    incremental_from, chain_reason = _chain(previous)
    raw = frozenset(d.target for d in disks if d.format != "qcow2")

    # Everything that takes time (a stale job aborted, a broken chain dropped) before the guest is frozen:
    # frozen, only libvirt's backupBegin runs.
    prepared = backup_job.prepare(dom, [d.target for d in disks], checkpoint, incremental_from,
                                  previous=_chain_state(previous), without_bitmap=raw)
    try:
        job, guest = guest_consistent(dom, options.consistency, prepared.start)
    finally:
        prepared.release()   # nothing once the job began: it holds what was prepared
    with job, ExitStack() as sources_open:
        chain_reason = job.full_reason or chain_reason
        point.libvirt.update(checkpoint=checkpoint, chain=asdict(job.chain))
        point.consistency, point.consistency_reason = guest.consistency, guest.reason
        point.quiesce = {"guest": guest.record()}
        _refuse_below(point, options.require)
        sources, tracked = [], {}
        for disk in disks:
            context = job.bitmap_context(disk.target)
            source = NbdDiskSource.open(disk.target, job.socket, job.export(disk.target), shown_as=str(disk.path),
                                        contexts=("base:allocation", context) if context else ("base:allocation",))
            sources_open.callback(source.close)
            sources.append(source)
            if context and previous is not None:
                tracked.update(_dirty(store, previous, source, context))
        reasons = {d.target: "a raw image keeps no dirty bitmap" if d.target in raw
                   else chain_reason or "the previous point's map of this disk did not fit it" for d in disks}
        result = _run(store, point, sources, progress, workers, tracked, checksum_reasons=reasons)
    try:
        backup_job.delete_checkpoints(dom, keep={checkpoint})
    except (RpfsError, libvirt_host.libvirt.libvirtError) as e:   # the point is safe; the next backup retries
        message = e.message if isinstance(e, RpfsError) else libvirt_host.error_text(e)
        result[1].notes.append(f"old checkpoints of {point.libvirt['domain']} stay until the next backup: {message}")
    return result


def _backup_shut_off(store: Store, point: RecoveryPoint, disks: list[domain.DomainDisk],
                     options: VmBackupOptions, progress: ProgressFn | None,
                     workers: int) -> tuple[RecoveryPoint, BackupSummary]:
    point.consistency, point.consistency_reason = "shut-off", "the domain was not running"
    _refuse_below(point, options.require)
    images = {d.target: (Path(d.path), d.format) for d in disks}
    with image_export.exported(images) as (socket, exports), ExitStack() as sources_open:
        sources = []
        for disk in disks:
            source = NbdDiskSource.open(disk.target, socket, exports[disk.target], shown_as=str(disk.path))
            sources_open.callback(source.close)
            sources.append(source)
        return _run(store, point, sources, progress, workers, {},
                    checksum_reasons={d.target: "the domain was shut off" for d in disks})


def _refuse_below(point: RecoveryPoint, required: str | None) -> None:
    if not at_least(point.consistency, required):
        raise RpfsError(f"no recovery point taken: it would be {point.consistency} consistent"
                        f" ({point.consistency_reason or 'no reason given'}), and {required} or better is required")


def _previous_point(store: Store, vm: str) -> RecoveryPoint | None:
    points = store.points(vm)
    return points[-1] if points else None


def _chain(previous: RecoveryPoint | None) -> tuple[str | None, str]:
    """The checkpoint an incremental starts from, or None and why every block is read (the job checks the
    chain itself: a missing or broken checkpoint, another UUID, a disk replaced)."""
    if previous is None:
        return None, "the first backup of this VM"
    if not previous.libvirt.get("checkpoint"):
        return None, f"the previous point {previous.id} has no checkpoint (not a backup of a running domain)"
    return previous.libvirt["checkpoint"], ""


def _chain_state(previous: RecoveryPoint | None) -> backup_job.ChainState | None:
    """The domain and its disks as the previous point recorded them (None: nothing to compare with)."""
    chain = previous.libvirt.get("chain") if previous is not None else None
    if not isinstance(chain, dict):
        return None
    try:
        return backup_job.ChainState(uuid=chain["uuid"], disks={
            target: backup_job.DiskIdentity(**disk) for target, disk in chain["disks"].items()})
    except (KeyError, TypeError, AttributeError):
        return None


def _dirty(store: Store, previous: RecoveryPoint, source: NbdDiskSource, context: str) -> dict[str, TrackedChanges]:
    """The blocks QEMU's dirty bitmap vouches for since the previous point, with that point's map."""
    old = next((d for d in previous.disks if d.name == source.name), None)
    if old is None or old.block_size != store.block_size or old.size != source.size:
        return {}
    try:
        previous_map = store.block_map(store.map_key(previous.vm, previous.id, old.name))
    except RpfsError:   # a damaged map: this disk is read whole
        return {}
    if len(previous_map) != old.blocks * DIGEST_SIZE:
        return {}
    unchanged = source.dirty_blocks(context, store.block_size)
    return {source.name: TrackedChanges(previous_map, unchanged, how="dirty-bitmap")}


@contextmanager
def _domain_lock(uuid: str) -> Iterator[None]:
    """One backup of a domain at a time on this host, whatever the store (a second is refused at once)."""
    fd = run_dir.open_domain_backup_lock(uuid)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RpfsError(f"another backup of domain {uuid} is running on this host") from None
        yield
    finally:
        os.close(fd)
