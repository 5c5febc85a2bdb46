"""A vault's copy of its store's key slots, kept in step with the store's.

The vault holds the store's key slots (keys.json) so that a machine without the store opens it with the
store's key file, passphrase or recovery private key. So a slot removed from the store must go from every
vault of it at once, or a leaked key file that was removed would still open them: every key change sends
the slots to each vault of the store named on this machine. Each vault is marked behind in the vault list
(config.keys_behind) before the change and unmarked once the slots are sent, so one that could not be
reached, or a command killed in between, leaves the mark: push, prune and `rpfs run` send the slots first
whenever they reach it, and reading it without the store says it is behind.
"""
from __future__ import annotations

from datetime import datetime, timezone

from rpfs.errors import RpfsError
from rpfs.store.store import Store
from rpfs.vault import config as vault_configs
from rpfs.vault.config import VaultConfig
from rpfs.vault.s3 import Bucket
from rpfs.vault.vault import bucket_of, probe, upload_key_slots


def send_key_slots(config: VaultConfig, store: Store) -> str | None:
    """Put the store's key slots as they are now in the vault; None when done, else why not (the vault is
    then marked behind). Only into the vault of this very store: a bucket that holds another is refused."""
    try:
        bucket = bucket_of(config)
        settings = probe(config, bucket)
        if (settings["store_id"], settings["key_check"]) != (store.store_id.hex(), store.meta.get("key_check")):
            raise RpfsError(f"bucket {config.bucket} holds another store's vault now")
        upload_key_slots(bucket, store.key_lock().slots)
    except RpfsError as e:
        _mark(config, config.keys_behind or _now())
        return e.message
    _mark(config, "")
    return None


def mark_behind(configs: list[VaultConfig]) -> list[VaultConfig]:
    """Mark vaults behind before a key change of their store: so a command killed after the change but
    before the upload leaves them marked, and the next push sends the slots (and readers are warned).
    Returns those it marked (the others were behind already)."""
    marked = [config for config in configs if not config.keys_behind]
    for config in marked:
        _mark(config, _now())
    return marked


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def send_current_slots(store: Store, config: VaultConfig, bucket: Bucket) -> None:
    """Put the store's key slots in the vault (push: at its start and its end), then read them again until
    what was put is what the store holds: a key change committed meanwhile, whose own upload may have come
    before this one, is not overwritten by older slots."""
    sent = None
    for _ in range(5):
        slots = store.key_lock().slots
        if slots == sent:
            break
        upload_key_slots(bucket, slots)
        sent = slots
    sent_key_slots(config)


def sent_key_slots(config: VaultConfig) -> None:
    """Record that the vault holds the store's slots as they are now (a push sent them)."""
    _mark(config, "")


def behind_warning(config: VaultConfig) -> str | None:
    """What to tell someone reading a vault whose slots are behind the store's, or None."""
    if not config.keys_behind:
        return None
    return (f"warning: {config.label} holds key slots older than its store's (a key change at {config.keys_behind}"
            f" could not be sent): a removed key still opens it until rpfs vault push {config.name}")


def _mark(config: VaultConfig, behind: str) -> None:
    current = vault_configs.vaults().get(config.name)
    if current is not None and current.keys_behind != behind and current.store_id == config.store_id:
        current.keys_behind = behind
        vault_configs.save(current)
    config.keys_behind = behind
