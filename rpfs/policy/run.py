"""`rpfs run`: every backup that is due (each pushed to its policy's vault), then prune, local and vault.

Due is worked out from each VM's last successful backup (schedule.py), so a missed slot is caught up.
VMs due at once run one at a time in a staggered order (the store has one writer); one VM's failure
does not stop the others, nor the prune that follows. A push that fails leaves the point local only;
the next run pushes it with the next one (a push sends every point the vault lacks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rpfs.backup.pipeline import BackupOptions, backup
from rpfs.backup.quiesce import load_config
from rpfs.backup.vm_backup import VmBackupOptions, backup_domain
from rpfs.catalog.build import catalog_new_point
from rpfs.errors import RpfsError
from rpfs.policy import offsite
from rpfs.policy.protection import get_policy, protections, retentions
from rpfs.policy.prune import prune
from rpfs.policy.schedule import is_due, stagger
from rpfs.store.leases import stale_leases
from rpfs.store.store import Store
from rpfs.upkeep import jobs


@dataclass
class RunResult:
    backed_up: list[str] = field(default_factory=list)
    not_due: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pruned: dict[str, list[str]] = field(default_factory=dict)
    pushed: dict[str, list[str]] = field(default_factory=dict)        # vm -> ids now in its vault too
    push_failed: dict[str, str] = field(default_factory=dict)         # "push of vm", "vault prune" -> why it failed
    catalog_failed: dict[str, str] = field(default_factory=dict)      # vm -> why its new point has no catalog
    vault_pruned: dict[str, list[str]] = field(default_factory=dict)  # "vault/vm" -> ids deleted there


def run(store: Store, now: datetime | None = None, stagger_seconds: float = 0.0, progress_for=None) -> RunResult:
    """Every backup that is due, then prune."""
    now = now or datetime.now(timezone.utc)
    result = RunResult()
    for dead in stale_leases(store.path):   # a killed run's (its push's) lease: running again finishes the job,
        dead.unlink(missing_ok=True)        # also when nothing is due any more and no new lease is taken

    due = []
    for vm, protection in sorted(protections(store).items()):
        policy = get_policy(store, protection.policy)
        points = store.points(vm)
        last = datetime.fromisoformat(points[-1].time) if points else None
        if is_due(policy.schedule, last, now):
            due.append((vm, protection, policy))
        else:
            result.not_due.append(vm)
    delays = stagger([vm for vm, _, _ in due], int(stagger_seconds))
    started = time.monotonic()
    for vm, protection, policy in sorted(due, key=lambda item: delays[item[0]]):
        wait = delays[vm] - (time.monotonic() - started)
        if wait > 0:
            time.sleep(wait)
        try:
            options = BackupOptions(
                consistency=load_config(Path(policy.consistency_config)) if policy.consistency_config else None,
                allow_live=bool(policy.options.get("allow_live", False)),
                keep_snapshot_days=policy.keep_snapshot_days)
            progress = progress_for(vm) if progress_for else None
            with jobs.recorded(store, "backup", vm) as job:
                if protection.libvirt:
                    point, summary = backup_domain(store, vm, protection.libvirt, progress=progress, options=VmBackupOptions(
                        options.consistency, require=policy.options.get("require_consistency"),
                        temporary=set(protection.temporary)))
                else:
                    point, summary = backup(store, vm, list(protection.disks.items()), progress=progress,
                                            options=options)
                job.bytes_read, job.bytes_written, job.recovery_point = (summary.disk_bytes_read, summary.stored_bytes,
                                                                         point.id)
            result.backed_up.append(vm)
        except RpfsError as e:
            result.failed[vm] = e.message
        except Exception as e:   # one VM's trouble must not stop the others, nor the prune
            result.failed[vm] = f"{type(e).__name__}: {e}"
        else:
            if policy.options.get("catalog", True):
                why = catalog_new_point(store, point)[1]
                if why:
                    result.catalog_failed[vm] = why
            if policy.vault:
                _guarded(result.push_failed, f"push of {vm}", lambda: result.pushed.update(
                    {vm: offsite.push_new_points(store, vm, policy)}))
    policies = retentions(store)
    if policies:
        with jobs.recorded(store, "prune") as job:
            for pruned in prune(store, policies):
                if pruned.pruned:
                    result.pruned[pruned.vm] = pruned.pruned
            job.bytes_written = sum(len(v) for v in result.pruned.values())
    by_vm = {vm: get_policy(store, protection.policy) for vm, protection in protections(store).items()}
    _guarded(result.push_failed, "vault prune", lambda: result.vault_pruned.update(offsite.upkeep_vaults(store, by_vm)))
    return result


def _guarded(failures: dict[str, str], what: str, step) -> None:
    """Run a vault step; a failure (the gateway down, above all) is recorded, and the run goes on."""
    try:
        step()
    except RpfsError as e:
        failures[what] = e.message
    except Exception as e:
        failures[what] = f"{type(e).__name__}: {e}"
