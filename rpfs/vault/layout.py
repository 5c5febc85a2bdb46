"""The vault's layout: every object's name, and the records only the vault writes (manifest, gc's record).

Objects (names under the vault's prefix; docs/design/vault.md):
  rpfs-vault.json     format and settings (version, store id, encryption, block ids, block size, key check)
  keys.json           the store's key slots: its master key wrapped for each key file, passphrase, recovery key
  packs/<name>        blobs and block map pieces, sealed as in the store, one after another (PACK_BYTES)
  index/<name>        what pack <name> holds: kind, id, offset, length per entry (sealed); written after the
                      pack, so a pack without an index is an interrupted upload (never read, gc removes it)
  points/<vm>/<id>    a recovery point's manifest (sealed): its record and, per disk, its block map's piece
                      ids; written after every pack it needs is indexed: a point exists only whole
  catalogs/<vm>/<id>  the point's catalog (sealed): its catalog record and every listing id it reaches;
                      written after its manifest and after every pack holding those listings is indexed
  holds/<name>        an instant restore from the vault in progress: its point and a copy of its sealed
                      manifest, so that prune skips the point and gc keeps what it needs even if it goes
  gc/condemned        the packs a gc condemned, for the next run to delete (sealed; gc.py)
  locks/<writer>      a push or gc at work; dead/<lock> its tombstone once a gc buried it (locks.py)
  clock/<random>      written and removed at once: the gateway's time (locks.py)
VaultObjects is a bucket seen as these objects: the rest of the vault names no object itself.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import BinaryIO

from rpfs.errors import CorruptBlockError
from rpfs.host.processes import machine_id
from rpfs.host.untrusted import parse_json
from rpfs.store.catalogs import Catalog
from rpfs.store.crypto import Keyring
from rpfs.store.recovery_point import NAME_RE, RecoveryPoint
from rpfs.store.store import Store

FORMAT_OBJECT = "rpfs-vault.json"
KEYS_OBJECT = "keys.json"
PACKS = "packs/"
INDEXES = "index/"
POINTS = "points/"
CATALOGS = "catalogs/"
HOLDS = "holds/"
CONDEMNED = "gc/condemned"
CONDEMNED_ASSOCIATED = b"vault-gc\0condemned"
LOCKS = "locks/"
TOMBSTONES = "dead/"
CLOCKS = "clock/"
LISTING_ID_BYTES = 32   # a catalog object names listings by their ids (the store's block ids)


def pack_object(pack: str) -> str:
    return PACKS + pack


def index_object(pack: str) -> str:
    return INDEXES + pack


def point_object(vm: str, point_id: str) -> str:
    return f"{POINTS}{vm}/{point_id}"


def catalog_object(vm: str, point_id: str) -> str:
    return f"{CATALOGS}{vm}/{point_id}"


def hold_object(name: str) -> str:
    """A hold of this machine (two machines may restore into the same path: their holds differ)."""
    return f"{HOLDS}{machine_id().split('-')[0][:16]}-{name}"


def hold_name(object_name: str) -> str:
    return object_name[len(HOLDS):]


def lock_object(writer: str) -> str:
    return LOCKS + writer


def tombstone(lock_name: str) -> str:
    return TOMBSTONES + lock_name


def clock_object(token: str) -> str:
    return CLOCKS + token


def manifest_associated(vm: str, point_id: str) -> bytes:
    return b"vault-points\0" + Store.point_key(vm, point_id)


def catalog_associated(vm: str, point_id: str) -> bytes:
    return b"vault-catalogs\0" + Store.point_key(vm, point_id)


def unseal(keyring: Keyring, label: str, associated: bytes, sealed: bytes, what: str) -> bytes:
    """A sealed record opened, or CorruptBlockError naming it."""
    try:
        return keyring.unseal_record(sealed, associated)
    except CorruptBlockError:
        raise CorruptBlockError(f"{label}: {what} fails authentication (changed, damaged, or moved from"
                                " elsewhere)") from None


@dataclass
class Manifest:
    """points/<vm>/<id>: a recovery point's record and, per disk, its block count and map piece ids."""
    point: RecoveryPoint
    maps: dict[str, tuple[int, list[bytes]]]

    def encode(self, keyring: Keyring) -> bytes:
        manifest = {"point": self.point.to_json().decode(),
                    "maps": {disk: {"count": count, "pieces": [p.hex() for p in ids]}
                             for disk, (count, ids) in self.maps.items()}}
        return keyring.seal_record(json.dumps(manifest).encode(), manifest_associated(self.point.vm, self.point.id))

    @classmethod
    def decode(cls, keyring: Keyring, label: str, vm: str, point_id: str, sealed: bytes) -> "Manifest":
        """Raises CorruptBlockError unless it opens as the manifest of vm/point_id."""
        data = unseal(keyring, label, manifest_associated(vm, point_id), sealed, f"the manifest of {vm}/{point_id}")
        try:
            manifest = json.loads(data)
            point = RecoveryPoint.from_json(manifest["point"].encode())
            maps = {disk: (entry["count"], [bytes.fromhex(p) for p in entry["pieces"]])
                    for disk, entry in manifest["maps"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorruptBlockError(f"{label}: the manifest of {vm}/{point_id} is damaged") from None
        return cls(point, maps)


@dataclass
class CatalogObject:
    """catalogs/<vm>/<id>: a point's catalog record (store/catalogs.py) and every listing id it reaches, so
    that gc knows what to keep without reading a listing, and a point pushed before it was cataloged gets
    its catalog by a later push (an object of its own, not part of the manifest)."""
    catalog: Catalog
    listings: list[bytes]

    def encode(self, keyring: Keyring) -> bytes:
        record = {"catalog": self.catalog.to_json().decode(),
                  "listings": base64.b64encode(b"".join(self.listings)).decode()}
        return keyring.seal_record(json.dumps(record).encode(),
                                   catalog_associated(self.catalog.vm, self.catalog.point_id))

    @classmethod
    def decode(cls, keyring: Keyring, label: str, vm: str, point_id: str, sealed: bytes) -> "CatalogObject":
        """Raises CorruptBlockError unless it opens as the catalog of vm/point_id."""
        what = f"the catalog of {vm}/{point_id}"
        data = unseal(keyring, label, catalog_associated(vm, point_id), sealed, what)
        try:
            record = json.loads(data)
            catalog = Catalog.from_json(record["catalog"].encode(), f"{vm}/{point_id}")
            packed = base64.b64decode(record["listings"], validate=True)
            if len(packed) % LISTING_ID_BYTES or (catalog.vm, catalog.point_id) != (vm, point_id):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorruptBlockError(f"{label}: {what} is damaged") from None
        except CorruptBlockError as e:
            raise CorruptBlockError(f"{label}: {e.message}") from None
        listings = [packed[n:n + LISTING_ID_BYTES] for n in range(0, len(packed), LISTING_ID_BYTES)]
        return cls(catalog, listings)


@dataclass
class Condemned:
    """gc/condemned: the packs a gc run condemned, for the next run (gc.py). Sealed like every record:
    whoever may write the bucket but not delete from it must not make gc delete a needed pack's index."""
    packs: dict[str, str | None]      # pack -> its sealed index (base64), None if it had none
    locks: list[str] | None = None    # the writers' locks once the indexes were hidden (None: not hidden yet)
    uploads: list[tuple[str, str]] = field(default_factory=list)   # (name, upload id) unfinished then

    def encode(self, keyring: Keyring) -> bytes:
        record = {"packs": self.packs, "locks": self.locks, "uploads": [list(u) for u in self.uploads]}
        return keyring.seal_record(json.dumps(record).encode(), CONDEMNED_ASSOCIATED)

    @classmethod
    def decode(cls, keyring: Keyring, label: str, sealed: bytes) -> "Condemned":
        """Raises CorruptBlockError if it does not open (damaged, forged, or written unsealed by an older
        rpfs: legacy_packs reads that one)."""
        data = unseal(keyring, label, CONDEMNED_ASSOCIATED, sealed, CONDEMNED)
        try:
            record = parse_json(data)
            packs, locks, uploads = record.get("packs"), record.get("locks"), record.get("uploads", [])
            if not isinstance(packs, dict) or not (locks is None or isinstance(locks, list)):
                raise ValueError
            return cls(packs, locks, [(str(name), str(upload_id)) for name, upload_id in uploads])
        except (ValueError, TypeError, AttributeError):
            raise CorruptBlockError(f"{label}: {CONDEMNED} is damaged") from None

    @staticmethod
    def legacy_packs(raw: bytes) -> dict[str, str] | None:
        """The packs and sealed indexes of a record written unsealed (an rpfs before records were sealed, or
        planted): only indexes that then open are put back (gc.py); None if raw is no such record."""
        try:
            packs = parse_json(raw)["packs"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(packs, dict):
            return None
        return {pack: sealed for pack, sealed in packs.items()
                if isinstance(pack, str) and isinstance(sealed, str) and sealed}

    @staticmethod
    def index_of(sealed: str) -> bytes:
        return base64.b64decode(sealed)


class VaultObjects:
    """A bucket (s3.py, or folder_bucket.py) seen as the vault's objects, by what they are."""

    def __init__(self, bucket):
        self.bucket = bucket

    # settings and key slots
    def format_record(self) -> bytes | None:
        return self.bucket.get(FORMAT_OBJECT)

    def put_format_record(self, data: bytes) -> None:
        self.bucket.put(FORMAT_OBJECT, data)

    def key_slots(self) -> bytes | None:
        return self.bucket.get(KEYS_OBJECT)

    def put_key_slots(self, data: bytes) -> None:
        self.bucket.put(KEYS_OBJECT, data)

    # packs and their indexes
    def packs(self) -> dict[str, int]:
        """pack -> size of every pack object (indexed or not), in name order."""
        return {name[len(PACKS):]: size for name, size in self.bucket.names(PACKS)}

    def put_pack(self, pack: str, stream: BinaryIO) -> None:
        self.bucket.put_stream(pack_object(pack), stream)

    def read_pack(self, pack: str, offset: int, length: int) -> bytes | None:
        return self.bucket.get(pack_object(pack), offset, length)

    def delete_pack(self, pack: str) -> None:
        self.bucket.delete(pack_object(pack))

    def unfinished_pack_uploads(self) -> list[tuple[str, str]]:
        return self.bucket.unfinished_uploads(PACKS)

    def abort_upload(self, name: str, upload_id: str) -> None:
        self.bucket.abort_upload(name, upload_id)

    def indexed_packs(self) -> list[str]:
        """Every pack that has an index, in name order."""
        return [name[len(INDEXES):] for name, _size in self.bucket.names(INDEXES)]

    def index(self, pack: str) -> bytes | None:
        return self.bucket.get(index_object(pack))

    def put_index(self, pack: str, sealed: bytes) -> None:
        self.bucket.put(index_object(pack), sealed)

    def delete_index(self, pack: str) -> None:
        self.bucket.delete(index_object(pack))

    # recovery points and holds
    def point_names(self) -> list[tuple[str, str]]:
        """(vm, point id) of every manifest, sorted; a name that is no manifest of ours is ignored."""
        return sorted(_vm_and_point(name[len(POINTS):]) for name, _size in self.bucket.names(POINTS)
                      if _vm_and_point(name[len(POINTS):]))

    def manifest(self, vm: str, point_id: str) -> bytes | None:
        return self.bucket.get(point_object(vm, point_id))

    def put_manifest(self, vm: str, point_id: str, sealed: bytes) -> None:
        self.bucket.put(point_object(vm, point_id), sealed)

    def delete_manifest(self, vm: str, point_id: str) -> None:
        self.bucket.delete(point_object(vm, point_id))

    def catalog_names(self) -> list[tuple[str, str]]:
        """(vm, point id) of every catalog object, sorted; a name that is no catalog of ours is ignored."""
        return sorted(_vm_and_point(name[len(CATALOGS):]) for name, _size in self.bucket.names(CATALOGS)
                      if _vm_and_point(name[len(CATALOGS):]))

    def catalog(self, vm: str, point_id: str) -> bytes | None:
        return self.bucket.get(catalog_object(vm, point_id))

    def put_catalog(self, vm: str, point_id: str, sealed: bytes) -> None:
        self.bucket.put(catalog_object(vm, point_id), sealed)

    def delete_catalog(self, vm: str, point_id: str) -> None:
        self.bucket.delete(catalog_object(vm, point_id))

    def hold_objects(self) -> list[str]:
        return [name for name, _size in self.bucket.names(HOLDS)]

    def hold(self, object_name: str) -> bytes | None:
        return self.bucket.get(object_name)

    def put_hold(self, name: str, data: bytes) -> None:
        """This machine's hold under that name."""
        self.bucket.put(hold_object(name), data)

    def delete_hold(self, name: str) -> None:
        self.bucket.delete(hold_object(name))

    # gc's record
    def condemned(self) -> bytes | None:
        return self.bucket.get(CONDEMNED)

    def put_condemned(self, sealed: bytes) -> None:
        self.bucket.put(CONDEMNED, sealed)

    def delete_condemned(self) -> None:
        self.bucket.delete(CONDEMNED)


def _vm_and_point(name: str) -> tuple[str, str] | None:
    """(vm, point id) of a name "<vm>/<id>", None if it is not one."""
    parts = name.split("/")
    if len(parts) == 2 and NAME_RE.fullmatch(parts[0]) and NAME_RE.fullmatch(parts[1]):
        return parts[0], parts[1]
    return None
