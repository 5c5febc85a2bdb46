"""Protection records: the policies kept in the store, and which VM follows which policy with which disks.

Temporary disks are listed on the VM but never backed up. A libvirt domain's disks are not listed: they
are found in the domain at each backup (its temporary disks are targets left out).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rpfs.backup.pipeline import parse_disk_specs
from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.policy.policies import Policy, Retention, policy_from_dict, policy_to_dict
from rpfs.policy.prune import delete_vm_points
from rpfs.store.recovery_point import check_name
from rpfs.store.store import Store


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
    libvirt: str = ""                                      # a libvirt domain, its disks found at each backup


def protect(store: Store, vm: str, policy: str, disk_specs: list[str], temporary_specs: list[str],
            libvirt: str = "") -> Protection:
    check_name("VM", vm)
    if store.get_record("protected", vm) is not None:
        raise RpfsError(f"VM {vm!r} is protected already (rpfs unprotect {vm} first to change it)")
    get_policy(store, policy)
    if libvirt:
        return _protect_domain(store, vm, policy, disk_specs, temporary_specs, libvirt)
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


def _protect_domain(store: Store, vm: str, policy: str, disk_specs: list[str], temporary: list[str],
                    domain_name: str) -> Protection:
    """Protect a libvirt domain: it must exist now; its temporary disks are targets (vdb, or vdb=PATH)."""
    from rpfs.vm import libvirt_host
    if disk_specs:
        raise RpfsError("give either --libvirt DOMAIN (its disks are found at each backup) or --disk, not both")
    libvirt_host.lookup(libvirt_host.connect(), domain_name)
    targets = {check_name("disk", spec.partition("=")[0]): "" for spec in temporary}
    protection = Protection(vm, policy, {}, targets, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            libvirt=domain_name)
    store.put_record("protected", vm, asdict(protection))
    return protection


def protections(store: Store) -> dict[str, Protection]:
    found = {}
    for vm, record in store.records("protected").items():
        try:
            found[vm] = Protection(**record)
        except TypeError:
            raise CorruptBlockError(f"the protection record of {vm!r} is damaged; rpfs check tells more") from None
    return found


def retentions(store: Store) -> dict[str, Retention]:
    """What prune keeps: each protected VM's retention, from its policy."""
    return {vm: get_policy(store, p.policy).retention for vm, p in protections(store).items()}


def unprotect(store: Store, vm: str, delete_data: bool) -> int:
    """Stop protecting a VM; its recovery points stay restorable, or are deleted. Returns points deleted."""
    if store.get_record("protected", vm) is None:
        raise RpfsError(f"VM {vm!r} is not protected")
    deleted = len(store.points(vm)) if delete_data else 0
    if delete_data:
        delete_vm_points(store, vm)
    store.delete_record("protected", vm)
    return deleted
