"""A policy's vault step: push each new recovery point off the host, and keep there what the vault keeps.

Two tiers, two retentions: the store keeps what the policy's retention keeps (the fast, local tier),
the vault what its vault retention keeps (none given: every point). Pruning the vault deletes
manifests only; its gc (vault/gc.py) frees the packs, condemned by one run and deleted by the next, so
`rpfs run` runs it after a vault prune deleted something, and while a condemnation is pending.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from rpfs.errors import RpfsError
from rpfs.policy.policies import Policy, Retention
from rpfs.policy.retention import select_kept
from rpfs.store.key_slots import KeyChoice
from rpfs.store.store import Store
from rpfs.upkeep import jobs


@dataclass
class VaultPrune:
    vault: str
    vm: str
    kept: dict[str, str] = field(default_factory=dict)   # id -> why
    pruned: list[str] = field(default_factory=list)


def push_new_points(store: Store, vm: str, policy: Policy) -> list[str]:
    """Push the VM's recovery points newer than its newest in the policy's vault (the new one, and any an
    earlier run failed to push; never one the vault pruned); recorded as a push job. Returns the ids pushed."""
    from rpfs.vault.named import open_vault
    from rpfs.vault.push import push
    with jobs.recorded(store, "push", vm) as job, \
            open_vault(policy.vault, KeyChoice(master=store.master_key), slots_from=store) as vault:
        summary = push(store, vault, store.points(vm))
        job.bytes_written = summary.uploaded_bytes
        job.recovery_point = summary.pushed[-1] if summary.pushed else None
    return [name.split("/", 1)[1] for name in summary.pushed]


def prune_vault(vault, retentions: dict[str, Retention], vm: str | None = None,
                dry_run: bool = False) -> list[VaultPrune]:
    """Delete the manifests each VM's vault retention no longer keeps (VMs without one keep everything)."""
    if vm is not None and vm not in retentions:
        raise RpfsError(f"VM {vm!r} has no vault retention in its policy, so the vault keeps all its points"
                        " (rpfs policy update NAME --vault-keep-daily N ...)")
    results = []
    held = {(hold.vm, hold.point_id): hold.target for hold in vault.holds()}
    for name in [vm] if vm else sorted(retentions):
        points = vault.points(name)
        kept_ids, reasons = select_kept([(p.id, datetime.fromisoformat(p.time), p.pinned or (name, p.id) in held)
                                         for p in points], retentions[name])
        for point in points:
            if (name, point.id) in held and not point.pinned:
                reasons[point.id] = reasons[point.id].replace("pinned", f"held by an instant restore into"
                                                                          f" {held[(name, point.id)]}")
        result = VaultPrune(vault=vault.config.name, vm=name, kept=reasons,
                            pruned=[p.id for p in points if p.id not in kept_ids])
        if not dry_run:
            for point_id in result.pruned:
                vault.delete_point(name, point_id)
        results.append(result)
    return results


def vault_retentions(store: Store, policies: dict[str, Policy]) -> dict[str, dict[str, Retention]]:
    """vault name -> {vm: what that vault keeps of it}, for the protected VMs whose policy has a vault
    retention (policies: vm -> its policy)."""
    found: dict[str, dict[str, Retention]] = {}
    for vm, policy in policies.items():
        if policy.vault and policy.vault_retention:
            found.setdefault(policy.vault, {})[vm] = policy.vault_retention
    return found


def upkeep_vaults(store: Store, policies: dict[str, Policy]) -> dict[str, list[str]]:
    """Prune every policy vault by its retentions, then gc it if that deleted something or a gc is pending.
    Returns "vault/vm" -> pruned ids."""
    from rpfs.vault.gc import gc, pending
    from rpfs.vault.named import open_vault
    pruned: dict[str, list[str]] = {}
    for name, retentions in sorted(vault_retentions(store, policies).items()):
        with open_vault(name, KeyChoice(master=store.master_key), slots_from=store) as vault:
            deleted = 0
            for result in prune_vault(vault, retentions):
                if result.pruned:
                    pruned[f"{name}/{result.vm}"] = result.pruned
                    deleted += len(result.pruned)
            if deleted or pending(vault):
                with jobs.recorded(store, "gc", None) as job:
                    job.bytes_written = gc(vault).deleted_bytes
    return pruned
