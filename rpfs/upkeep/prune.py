"""Keeping a store healthy: prune (retention), gc (unreferenced blocks), compact, verify.

Safety without time-based grace periods: every block map's blocks are counted in `refs`, in the same
transaction that adds or deletes the recovery point. prune deletes recovery points (never one a mount
has open: leases.py) and gc deletes only blocks with no reference, both under the store's writer lock,
so no running backup can be relying on a block gc removes.
"""
from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from rpfs.backup import snapshot
from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.policy.retention import select_kept
from rpfs.store import blob
from rpfs.store.leases import gate, leased_points
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import Store, distinct_digests

LOCK_WAIT_SECONDS = 600


@dataclass
class PruneResult:
    vm: str
    kept: dict[str, str] = field(default_factory=dict)     # id -> why
    pruned: list[str] = field(default_factory=list)
    released_blocks: int = 0


def _refuse_if_backing_up(vm: str | None):
    """Changing a VM's recovery points while it is being backed up is refused; anything else waits."""
    def refuse(holder: str) -> str | None:
        if vm is not None and holder.startswith(f"backup of {vm} "):
            return f"a backup of {vm} is running ({holder}); prune it after the backup finishes"
        return None
    return refuse


def prune(store: Store, policies: dict[str, object], vm: str | None = None, dry_run: bool = False) -> list[PruneResult]:
    """Delete the recovery points each VM's policy no longer keeps. policies: vm -> Retention."""
    vms = [vm] if vm else sorted(policies)
    if vm and vm not in policies:
        raise RpfsError(f"VM {vm!r} is not protected by a policy, so nothing says what to keep"
                        " (rpfs protect VM --policy NAME ...)")
    results = []
    with store.writer_lock(f"prune of {vm or 'all VMs'}", wait_seconds=0 if dry_run else LOCK_WAIT_SECONDS,
                           refuse=_refuse_if_backing_up(vm)):
        leased = leased_points(store.path)
        for name in vms:
            points = store.points(name)
            kept_ids, reasons = select_kept([(p.id, datetime.fromisoformat(p.time), p.pinned) for p in points],
                                            policies[name])
            result = PruneResult(vm=name, kept=dict(reasons))
            for p in points:
                if p.id in kept_ids:
                    continue
                if (p.vm, p.id) in leased:
                    result.kept[p.id] = f"in use by {leased[(p.vm, p.id)]}"
                    continue
                result.pruned.append(p.id)
            if not dry_run:
                for p in points:
                    if p.id not in result.pruned:
                        continue
                    with gate(store.path, exclusive=True):   # no reader can take a lease meanwhile
                        holder = leased_points(store.path).get((p.vm, p.id))   # opened since the first look?
                        if holder:
                            result.pruned.remove(p.id)
                            result.kept[p.id] = f"in use by {holder}"
                            continue
                        result.released_blocks += _delete_point(store, p)
            results.append(result)
    return results


def _delete_point(store: Store, point: RecoveryPoint) -> int:
    released = []
    store.write(lambda txn: released.append(store.delete_point(txn, point)))
    if point.snapshot:
        snapshot.delete(point.snapshot.get("paths", {}).values())
    return released[-1]


def delete_vm_points(store: Store, vm: str) -> int:
    """unprotect --delete-data: every recovery point of the VM (refused while a reader has one open).
    Returns how many blocks became unreferenced (rpfs gc removes them)."""
    with store.writer_lock(f"deleting {vm}", wait_seconds=LOCK_WAIT_SECONDS, refuse=_refuse_if_backing_up(vm)):
        leased = leased_points(store.path)
        points = store.points(vm)
        busy = [p.id for p in points if (vm, p.id) in leased]
        if busy:
            raise RpfsError(f"recovery point {vm}/{busy[0]} is open through a mount; unmount it first")
        return sum(_delete_point(store, p) for p in points)


@dataclass
class GcResult:
    removed_blocks: int = 0
    freed_bytes: int = 0


def gc(store: Store) -> GcResult:
    """Remove every block no recovery point references; LMDB reuses the freed pages."""
    result = GcResult()
    with store.writer_lock("gc", wait_seconds=LOCK_WAIT_SECONDS):
        batch: list[bytes] = []
        removed: list[int] = []   # sizes; filled anew if a full map makes store.write run remove again

        def remove(txn):
            removed.clear()
            for digest in batch:
                value = txn.get(digest, db=store.db("blocks"))
                if value is not None:
                    removed.append(len(value))
                    txn.delete(digest, db=store.db("blocks"))

        def commit():
            store.write(remove)
            result.removed_blocks += len(removed)
            result.freed_bytes += sum(removed)
        for digest in list(store.unreferenced_blocks()):
            batch.append(digest)
            if len(batch) >= 4096:
                commit()
                batch = []
        commit()
    return result


def compact(store: Store) -> tuple[int, int]:
    """Write a compacted copy of the LMDB file and swap it in; refused while anyone else has it open.

    Every Store handle holds STORE/open.lock shared; compact holds it exclusive for the whole copy and
    swap, so nothing can open the store and write into the file being replaced."""
    with store.writer_lock("compact", wait_seconds=LOCK_WAIT_SECONDS):
        if not store.exclusive_open():
            raise RpfsError(f"store {store.path} is open in another process (a mount, a backup?); close it first")
        before = (store.path / "data.mdb").stat().st_size
        work = store.path / "compact.tmp"
        work.mkdir(exist_ok=True)
        try:
            store.copy_compacted(work)
            with open(work / "data.mdb", "rb") as f:
                os.fsync(f.fileno())
            os.replace(work / "data.mdb", store.path / "data.mdb")
            (store.path / "lock.mdb").unlink(missing_ok=True)   # its transaction ids were the old file's
            fd = os.open(store.path, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
        finally:
            for leftover in work.glob("*"):
                leftover.unlink()
            work.rmdir()
        return before, (store.path / "data.mdb").stat().st_size


@dataclass
class VerifyResult:
    checked_blocks: int = 0
    checked_bytes: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)   # "vm/id" -> ["disk: digest: reason"]


def verify(store: Store, vm: str | None = None, point_id: str | None = None, sample_percent: float = 100.0,
           progress=None) -> VerifyResult:
    """Read every referenced block (or a random sample) and check it against its digest."""
    if not 0 < sample_percent <= 100:
        raise RpfsError("--sample must be a percentage above 0 and at most 100")
    points = [store.point(vm, point_id)] if point_id else store.points(vm)
    if vm and not points:
        store.point(vm)   # raises: unknown VM
    users: dict[bytes, list[tuple[str, str]]] = {}
    for p in points:
        for d in p.disks:
            for digest in distinct_digests(store.block_map(store.map_key(p.vm, p.id, d.name))):
                users.setdefault(digest, []).append((f"{p.vm}/{p.id}", d.name))
    digests = list(users)
    if sample_percent < 100:
        digests = random.sample(digests, max(1, round(len(digests) * sample_percent / 100))) if digests else []
    result = VerifyResult()

    def check(digest: bytes) -> tuple[bytes, int, str | None]:
        try:
            raw = store.get_blob(digest, blob.decode)
            if raw is None:
                return digest, 0, "missing"
            if hashlib.sha256(raw).digest() != digest:
                return digest, len(raw), "does not match its digest"
            return digest, len(raw), None
        except CorruptBlockError as e:
            return digest, 0, e.message
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for digest, size, problem in pool.map(check, digests):
            result.checked_blocks += 1
            result.checked_bytes += size
            if problem:
                for point, disk in users[digest]:
                    result.damaged.setdefault(point, []).append(f"{disk}: block {digest.hex()[:16]}: {problem}")
            if progress:
                progress(result.checked_blocks, len(digests))
    return result
