"""Prune: delete the recovery points a retention no longer keeps (and their kept snapshots).

Never a pinned point, and never one a reader has open (store/leases.py). Deleting a point releases
its blocks' references in the same transaction; the blocks themselves go later, with gc.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from rpfs.backup import snapshot
from rpfs.errors import RpfsError
from rpfs.policy.retention import select_kept
from rpfs.store.leases import gate, leased_points
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import Store

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
        snapshot.delete(point.snapshot.paths.values())
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
