"""Protecting VMs: policies kept in the store, which VM follows which policy, and `rpfs run`.

`run` backs up every protected VM whose schedule says it is due (from its last successful backup, so
a missed slot is caught up), one VM at a time in staggered order (the store has one writer), then
prunes what the policies no longer keep. Temporary disks are listed on the VM but never backed up.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rpfs.backup.pipeline import BackupOptions, backup, parse_disk_specs
from rpfs.backup.quiesce import load_config
from rpfs.errors import RpfsError
from rpfs.policy.policies import Policy, policy_from_dict, policy_to_dict
from rpfs.policy.schedule import is_due, stagger
from rpfs.store.recovery_point import check_name
from rpfs.store.store import Store
from rpfs.upkeep import jobs
from rpfs.upkeep.prune import delete_vm_points, prune


def save_policy(store: Store, policy: Policy, replace: bool = False) -> None:
    if not replace and store.get_record("policies", policy.name) is not None:
        raise RpfsError(f"policy {policy.name!r} exists already (rpfs policy update, or another name)")
    store.put_record("policies", policy.name, policy_to_dict(policy))


def get_policy(store: Store, name: str) -> Policy:
    record = store.get_record("policies", name)
    if record is None:
        known = ", ".join(sorted(store.records("policies"))) or "none yet"
        raise RpfsError(f"unknown policy {name!r} (policies: {known})")
    return policy_from_dict(record)


def delete_policy(store: Store, name: str) -> None:
    get_policy(store, name)
    users = sorted(vm for vm, p in store.records("protected").items() if p["policy"] == name)
    if users:
        raise RpfsError(f"policy {name!r} protects {', '.join(users)}; move or unprotect them first")
    store.delete_record("policies", name)


@dataclass
class Protection:
    vm: str
    policy: str
    disks: dict[str, str]                                  # name -> path, backed up
    temporary: dict[str, str] = field(default_factory=dict)  # name -> path, never backed up
    since: str = ""


def protect(store: Store, vm: str, policy: str, disk_specs: list[str], temporary_specs: list[str]) -> Protection:
    check_name("VM", vm)
    if store.get_record("protected", vm) is not None:
        raise RpfsError(f"VM {vm!r} is protected already (rpfs unprotect {vm} first to change it)")
    get_policy(store, policy)
    disks = dict(parse_disk_specs(disk_specs))
    temporary = dict(parse_disk_specs(temporary_specs)) if temporary_specs else {}
    both = set(disks) & set(temporary)
    if both:
        raise RpfsError(f"disk {sorted(both)[0]!r} is given both as a disk and as a temporary disk")
    for name, path in disks.items():
        if not Path(path).exists():
            raise RpfsError(f"disk {name}: {path} does not exist")
    protection = Protection(vm, policy, {n: str(Path(p).absolute()) for n, p in disks.items()},
                            {n: str(Path(p).absolute()) for n, p in temporary.items()},
                            datetime.now(timezone.utc).isoformat(timespec="seconds"))
    store.put_record("protected", vm, asdict(protection))
    return protection


def protections(store: Store) -> dict[str, Protection]:
    return {vm: Protection(**record) for vm, record in store.records("protected").items()}


def unprotect(store: Store, vm: str, delete_data: bool) -> int:
    """Stop protecting a VM; its recovery points stay restorable, or are deleted. Returns points deleted."""
    if store.get_record("protected", vm) is None:
        raise RpfsError(f"VM {vm!r} is not protected")
    deleted = len(store.points(vm)) if delete_data else 0
    if delete_data:
        delete_vm_points(store, vm)
    store.delete_record("protected", vm)
    return deleted


@dataclass
class RunResult:
    backed_up: list[str] = field(default_factory=list)
    not_due: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pruned: dict[str, list[str]] = field(default_factory=dict)


def run(store: Store, now: datetime | None = None, stagger_seconds: float = 0.0, progress_for=None) -> RunResult:
    """Every backup that is due, then prune."""
    now = now or datetime.now(timezone.utc)
    result = RunResult()
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
            with jobs.recorded(store, "backup", vm) as job:
                point, summary = backup(store, vm, list(protection.disks.items()),
                                        progress=progress_for(vm) if progress_for else None, options=options)
                job.bytes_read, job.bytes_written, job.recovery_point = (summary.bytes_read, summary.stored_bytes,
                                                                         point.id)
            result.backed_up.append(vm)
        except RpfsError as e:
            result.failed[vm] = e.message
        except Exception as e:   # one VM's trouble must not stop the others, nor the prune
            result.failed[vm] = f"{type(e).__name__}: {e}"
    policies = {vm: get_policy(store, p.policy).retention for vm, p in protections(store).items()}
    if policies:
        with jobs.recorded(store, "prune") as job:
            for pruned in prune(store, policies):
                if pruned.pruned:
                    result.pruned[pruned.vm] = pruned.pruned
            job.bytes_written = sum(len(v) for v in result.pruned.values())
    return result
