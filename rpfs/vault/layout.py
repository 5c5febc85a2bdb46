"""The vault's object names.

Objects (names under the vault's prefix; README, The vault):
  rpfs-vault.json     format and settings (version, store id, encryption, block ids, block size, key check)
  keys.json           the store's key slots: its master key wrapped for each key file, passphrase, recovery key
  packs/<name>        blobs and block map pieces, sealed as in the store, one after another (PACK_BYTES)
  index/<name>        what pack <name> holds: kind, id, offset, length per entry (sealed); written after the
                      pack, so a pack without an index is an interrupted upload (never read, gc removes it)
  points/<vm>/<id>    a recovery point's manifest (sealed): its record and, per disk, its block map's piece
                      ids; written after every pack it needs is indexed: a point exists only whole
  holds/<name>        an instant restore from the vault in progress: its point and a copy of its sealed
                      manifest, so that prune skips the point and gc keeps what it needs even if it goes
"""
from __future__ import annotations

from rpfs.store.store import Store
from rpfs.host.processes import machine_id

FORMAT_OBJECT = "rpfs-vault.json"
CONDEMNED = "gc/condemned"           # gc.py
CONDEMNED_ASSOCIATED = b"vault-gc\0condemned"
KEYS_OBJECT = "keys.json"


def pack_object(pack: str) -> str:
    return f"packs/{pack}"


def index_object(pack: str) -> str:
    return f"index/{pack}"


def point_object(vm: str, point_id: str) -> str:
    return f"points/{vm}/{point_id}"


def hold_object(name: str) -> str:
    """A hold of this machine (two machines may restore into the same path: their holds differ)."""
    return f"holds/{machine_id().split('-')[0][:16]}-{name}"


def manifest_associated(vm: str, point_id: str) -> bytes:
    return b"vault-points\0" + Store.point_key(vm, point_id)
