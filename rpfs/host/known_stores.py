"""Root's own record of the stores this machine opened encrypted: RPFS_CONFIG/encrypted-stores.json.

A store's files say whether it is encrypted, and whoever can write them can make it say "not encrypted"
(its key check, key slots and id deleted with it). A key given with the command is then refused (Store),
but an admin who types the passphrase on a terminal is simply not asked, and would back up in the clear.
So root keeps, beside the store and out of its writers' reach, the path (resolved) and id of each store
it opened encrypted: a store there that says otherwise is refused. `rpfs init` of a new store at a path
forgets the old record. Best effort: a record that cannot be written (a read-only /etc) guards nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.host.access import make_private_folder, open_trusted
from rpfs.host.files import write_whole
from rpfs.host.untrusted import parse_json

DEFAULT_CONFIG = "/etc/rpfs"
RECORD = "encrypted-stores.json"


def config_folder() -> Path:
    """Where root keeps what it was told about vaults and stores (RPFS_CONFIG, default /etc/rpfs)."""
    return Path(os.environ.get("RPFS_CONFIG") or DEFAULT_CONFIG)


def encrypted_stores() -> dict[str, str]:
    """resolved store path -> store id (hex) of every store this machine opened encrypted."""
    path = config_folder() / RECORD
    if not path.exists():
        return {}
    fd = open_trusted(path, "list of encrypted stores")
    with os.fdopen(fd, "rb") as f:
        try:
            found = parse_json(f.read())
            if isinstance(found, dict) and all(isinstance(v, str) for v in found.values()):
                return found
        except ValueError:
            pass
    raise RpfsError(f"{path} is damaged (not the list rpfs writes); remove it (rpfs writes it again)")


def was_encrypted(store: Path) -> bool:
    return os.path.realpath(store) in encrypted_stores()


def remember_encrypted(store: Path, store_id: str) -> None:
    """Record an encrypted store (a write only when it is new here, or another store took its path)."""
    _change(os.path.realpath(store), store_id)


def forget(store: Path) -> None:
    """A new store is made at this path (init): what was there before is no more."""
    _change(os.path.realpath(store), None)


def _change(key: str, store_id: str | None) -> None:
    try:
        found = encrypted_stores()
        if found.get(key) == store_id:
            return
        found = {path: i for path, i in found.items() if os.path.exists(path) and path != key}   # gone: forgotten
        if store_id is not None:
            found[key] = store_id
        make_private_folder(config_folder())
        write_whole(config_folder() / RECORD, json.dumps(found, indent=2, sort_keys=True).encode() + b"\n",
                    durable=True)
    except OSError:
        pass   # best effort (module docstring)
