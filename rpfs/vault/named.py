"""A vault opened by the name this machine's vault list gives it (config.py): the one way to do so.

Its key slots may be behind the store's (a key change that could not reach it: keys.py). Given the store,
they are sent first; given a warn, the reader is told that a removed key still opens it.
"""
from __future__ import annotations

from typing import Callable

from rpfs.store.key_slots import KeyChoice
from rpfs.store.store import Store
from rpfs.vault.config import vault_config
from rpfs.vault.keys import behind_warning, send_key_slots
from rpfs.vault.vault import Vault


def open_vault(name: str, keys: KeyChoice, *, slots_from: Store | None = None,
               warn: Callable[[str], None] | None = None) -> Vault:
    """The vault called name, unlocked with keys (the store's key opens it too: the vault holds its slots).
    slots_from: its store, whose key slots are sent first if they are behind (still behind if that fails:
    the open says why); warn: told when they are behind."""
    config = vault_config(name)
    if slots_from is not None and config.keys_behind:
        send_key_slots(config, slots_from)
    if warn is not None and (warning := behind_warning(config)) is not None:
        warn(warning)
    return Vault.open(config, keys)
