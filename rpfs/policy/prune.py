"""Prune: delete the recovery points a retention no longer keeps (and their kept snapshots).

Never a pinned point, and never one a reader has open (store/leases.py). Deleting a point releases
its blocks' references in the same transaction; the blocks themselves go later, with gc.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from rpfs.backup import snapshot
from rpfs.errors import RpfsError
from rpfs.policy.policies import Retention
from rpfs.policy.retention import select_kept
from rpfs.store.leases import gate, leased_points
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import WRITER_WAIT_SECONDS, Store


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


def prune(store: Store, policies: dict[str, Retention], vm: str | None = None, dry_run: bool = False) -> list[PruneResult]:
    """Delete the recovery points each VM's policy no longer keeps. policies: vm -> Retention."""
    vms = [vm] if vm else sorted(policies)
    if vm and vm not in policies:
        raise RpfsError(f"VM {vm!r} is not protected by a policy, so nothing says what to keep"
                        " (rpfs protect VM --policy NAME ...)")
    results = []
    with store.writer_lock(f"prune of {vm or 'all VMs'}", wait_seconds=0 if dry_run else WRITER_WAIT_SECONDS,
                           refuse=_refuse_if_backing_up(vm)):
        for name in vms:
            points = store.points(name)
            kept_ids, reasons = select_kept([(p.id, datetime.fromisoformat(p.time), p.pinned) for p in points],
                                            policies[name])
            result = PruneResult(vm=name, kept=dict(reasons))
            unwanted = [p for p in points if p.id not in kept_ids]
            if dry_run:
                leased = leased_points(store.path)
                result.kept.update({p.id: f"in use by {leased[(p.vm, p.id)]}"
                                    for p in unwanted if (p.vm, p.id) in leased})
                result.pruned = [p.id for p in unwanted if p.id not in result.kept]
            else:
                result.pruned, in_use, result.released_blocks = delete_points(store, unwanted)
                result.kept.update(in_use)
            results.append(result)
    return results


def delete_points(store: Store, points: list[RecoveryPoint]) -> tuple[list[str], dict[str, str], int]:
    """Delete recovery points and their kept snapshots, except those a reader has open.

    Each is deleted under the exclusive gate after a last look at the leases; readers lease a point
    and check it still exists under the shared gate (Lease.take), so a reader either saw the point go or
    keeps it. Returns (deleted ids, id -> why kept, how many blocks became unreferenced)."""
    deleted: list[str] = []
    in_use: dict[str, str] = {}
    released = 0
    for point in points:
        with gate(store.path, exclusive=True):
            holder = leased_points(store.path).get((point.vm, point.id))
            if holder:
                in_use[point.id] = f"in use by {holder}"
                continue
            if store.has_point(point.vm, point.id) and store.point(point.vm, point.id).pinned:
                in_use[point.id] = "pinned"   # since prune decided
                continue
            if point.snapshot:   # files first: a record whose snapshot files are gone is harmless
                snapshot.delete(point.snapshot.paths.values())
            released += store.delete_point(point)
        deleted.append(point.id)
    return deleted, in_use, released


def delete_vm_points(store: Store, vm: str) -> int:
    """unprotect --delete-data: every recovery point of the VM, refused while a reader has one open.
    Returns how many blocks became unreferenced (rpfs gc removes them)."""
    with store.writer_lock(f"deleting {vm}", wait_seconds=WRITER_WAIT_SECONDS, refuse=_refuse_if_backing_up(vm)):
        points = store.points(vm)
        leased = leased_points(store.path)
        busy = [p.id for p in points if (vm, p.id) in leased]
        if not busy:
            _, in_use, released = delete_points(store, points)
            busy = list(in_use)   # opened since the first look
        if busy:
            raise RpfsError(f"recovery point {vm}/{busy[0]} is open through a mount or a restore; close it first"
                            " (the other recovery points were left as they were, or deleted: run this again)")
        return released
