"""A vault: one store's recovery points in an S3 bucket, read through the same image path as the store.

Its objects and their layout: vault/layout.py (docs/design/vault.md).
A vault is bound to the store it was made from (same master key and block ids: blobs go up as they are,
and only blobs the vault lacks go up); a vault only ever holds encrypted data.

Vault format 2 differs from 1 only in that its blobs may be sealed under keys of their own (store format
6, blob.py FLAG_BLOCK_KEY), which an rpfs that reads only version 1 would take for damage. So the version
follows the store: a vault of a format 6 store is 2 (made so, or raised by the first push from it, before
any blob goes up), and an older rpfs refuses it with one clear line; this rpfs reads both.
Vault format 3 may hold catalogs (listings in packs, catalogs/<vm>/<id>): an rpfs reading only 2 would not
count the listings as needed and its gc would delete them, so the first push of a catalog raises the
vault to 3 before any listing goes up.
"""
from __future__ import annotations

import base64
import json
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import zstandard

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.untrusted import parse_json
from rpfs.store.blob import BlockCodec, Cut, frame_span, head_size
from rpfs.store.block_maps import where
from rpfs.store.catalogs import Catalog, Entry, decode_listing, open_listing
from rpfs.store.key_slots import KeyChoice, KeyLock, KeySlot
from rpfs.store.recovery_point import DIGEST_SIZE, RecoveryPoint
from rpfs.store.source import NoKeeper, SourceName
from rpfs.store.store import MapPieces, Store, key_settings
from rpfs.vault.config import VaultConfig, vault_config
from rpfs.vault.folder_bucket import FolderBucket
from rpfs.vault.index_cache import IndexCache
from rpfs.vault.layout import (FORMAT_OBJECT, KEYS_OBJECT, CatalogObject, Condemned, Manifest, VaultObjects,
                               catalog_object, hold_name, hold_object, point_object, unseal)
from rpfs.vault.runs import RunReader
from rpfs.vault.s3 import Bucket

FORMAT = "rpfs-vault"
FORMAT_VERSION = 3                   # 2: blobs may have keys of their own; 3: catalogs (above)
BLOCK_KEYS_VERSION = 2               # the vault version whose blobs may have keys of their own
CATALOGS_VERSION = 3                 # the vault version that may hold catalogs
READ_VERSIONS = (1, BLOCK_KEYS_VERSION, CATALOGS_VERSION)
BLOCK_KEYS_STORE_FORMAT = 6          # the store format whose blobs may have keys of their own
SETTINGS = ("encryption", "block_id", "block_size", "zstd_level")   # copied from the store's meta
ENTRY = struct.Struct("<c32sQI")     # an index entry: kind (b"b" blob, b"p" piece, b"l" listing), id, offset, length
BLOB, PIECE, LISTING = b"b", b"p", b"l"
LISTINGS_KEPT = 32 << 20             # bytes of listings kept once read (find reads the same folders for each point)
LISTING_RUN_BYTES = 1 << 20          # a listing is fetched with those after it in its pack, up to this much: a
                                     # push sends a catalog's listings together, and find reads them all
LISTING_SECONDS = 1.0                # how long a listing of the manifests is reused
INDEX_READERS = 16                    # index objects fetched at once when a vault is opened
HEAD_BYTES = 4096                     # first GET of a blob for a random read: header and frame table
HEADS_KEPT = 65536                    # blob heads kept (about 170 bytes each for a 1 MiB block)
T = TypeVar("T")


class PackMissing(CorruptBlockError):
    """A pack the index named is gone (deleted by gc after a repack, or lost)."""


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int


@dataclass(frozen=True)
class Hold:
    """An unfinished instant restore's claim on a recovery point of the vault."""
    name: str
    vm: str
    point_id: str
    target: str
    manifest: bytes   # the point's sealed manifest, as it was when the hold was taken


class Vault:
    """An opened vault, a RecoverySource (store/source.py). Reads are thread-safe; one push at a time writes
    (push.py)."""

    parallel_reads = 16   # ranged GETs wait on the network, not the CPU: a restore or mount keeps this many going
    kept_snapshots = False   # its points are read from the vault, never from snapshots a backup kept here

    def __init__(self, config: VaultConfig, bucket: Bucket, settings: dict, lock: KeyLock, keys: KeyChoice | None):
        self.config, self.bucket, self.settings = config, bucket, settings
        self.objects = VaultObjects(bucket)
        self.path = Path(config.label)   # what messages call it (as a store's path)
        self.store_id = bytes.fromhex(settings["store_id"])
        self.block_size = int(settings["block_size"])
        self.encrypted = True
        self.keyring = (keys or KeyChoice()).unlock(lock)
        self.codec = BlockCodec(settings["block_id"], int(settings["zstd_level"]), self.keyring)
        self._index: dict[tuple[bytes, bytes], Location] | None = None
        self._index_read = 0.0
        self._index_lock = threading.Lock()
        self._index_copies = IndexCache(config)
        self._manifests: OrderedDict[str, tuple[RecoveryPoint, dict]] = OrderedDict()
        self._held: dict[str, tuple[RecoveryPoint, dict]] = {}   # manifests adopted from holds: never evicted
        self._pieces = MapPieces()
        self._runs = RunReader(self._read_pack, self.index)
        self._listing_runs = RunReader(self._read_pack, self.index, LISTING_RUN_BYTES, LISTINGS_KEPT)
        self._heads: OrderedDict[tuple[str, int], bytes] = OrderedDict()   # blob heads by place: random reads
        self._heads_lock = threading.Lock()   # not the index's: an index reload must not stall random reads
        self.created = False   # by Vault.create, in this call
        self._listing: tuple[float, list[tuple[str, str]]] = (-LISTING_SECONDS, [])
        self._catalogs: OrderedDict[str, CatalogObject | None] = OrderedDict()
        self._listings: OrderedDict[bytes, bytes] = OrderedDict()   # listing id -> its bytes, checked
        self._listings_bytes = 0
        self._listings_lock = threading.Lock()
        self._zstd = threading.local()   # a compressor per thread (listings pushed)

    # -- making and opening ----------------------------------------------------------------------
    @classmethod
    def create(cls, config: VaultConfig, store: Store) -> "Vault":
        """A vault for an encrypted store in the config's bucket (made if missing); a bucket that holds this
        store's vault already is adopted, another store's or another format's refused."""
        if not store.encrypted:
            raise RpfsError(f"store {store.path} is not encrypted; a vault only ever holds encrypted data (back up"
                            " into an encrypted store: rpfs init makes one by default)")
        bucket = bucket_of(config)
        bucket.ensure_bucket()
        settings = {"format": FORMAT, "format_version": vault_version_for(store), "store_id": store.store_id.hex(),
                    "key_check": store.meta["key_check"],
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **{name: store.meta.get(name, "") for name in SETTINGS}}
        found = _settings(bucket)
        created = found is None
        if found is not None:
            if found["store_id"] != settings["store_id"]:
                raise RpfsError(f"{config.label}: bucket {config.bucket} holds the vault of another store (id"
                                f" {found['store_id']}); give another --bucket or --prefix")
        else:
            upload_key_slots(bucket, store.key_lock().slots)
            VaultObjects(bucket).put_format_record(json.dumps(settings, indent=2).encode())   # last: it exists now
        vault = cls.open(config, KeyChoice(master=store.master_key))
        vault.created = created
        return vault

    @classmethod
    def open(cls, config: VaultConfig, keys: KeyChoice | None = None) -> "Vault":
        bucket = bucket_of(config)
        settings = probe(config, bucket)
        if config.store_id and (config.store_id, config.key_check) != (settings["store_id"], settings["key_check"]):
            raise RpfsError(f"{config.label}: bucket {config.bucket} now holds another vault (store id"
                            f" {settings['store_id']}, it held {config.store_id} when added); refused: someone may"
                            " have replaced it (rpfs vault remove, then add it again if this is expected)")
        raw = VaultObjects(bucket).key_slots()
        try:
            slots, damaged = [], []
            for record in parse_json(raw or b"null"):
                try:
                    slots.append(KeySlot.from_json(json.dumps(record).encode()))
                except CorruptBlockError:   # the others still open it, as a store's (Store.key_lock)
                    damaged.append(str(record.get("id", "?")) if isinstance(record, dict) else "?")
            lock = KeyLock(Path(config.label), bytes.fromhex(settings["store_id"]), key_settings(settings),
                           bytes.fromhex(settings["key_check"]), slots, damaged, what=config.label,
                           hint="the vault holds the store's key slots as of its last push")
        except (ValueError, TypeError, KeyError):
            raise RpfsError(f"{config.label}: its key slots ({KEYS_OBJECT}) are missing or damaged") from None
        return cls(config, bucket, settings, lock, keys)

    def raise_version_for(self, store: Store) -> None:
        """Mark the vault with the version that reads the blobs of store (push, before any goes up)."""
        self.raise_version(vault_version_for(store))

    def raise_version(self, wanted: int) -> None:
        """Mark the vault with version wanted unless it has that or a later one already."""
        found = _settings(self.bucket) or self.settings
        if int(found["format_version"]) < wanted:
            self.settings = {**found, "format_version": wanted}
            self.objects.put_format_record(json.dumps(self.settings, indent=2).encode())

    @property
    def master_key(self) -> bytes:
        """The unlocked master key, to hand to a daemon of rpfs's own (as Store.master_key)."""
        return self.keyring.master

    def close(self) -> None:
        pass

    def __enter__(self) -> "Vault":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def source_name(self) -> SourceName:
        return SourceName(vault=self.config.name)

    def keeper(self) -> NoKeeper:
        """Nothing on this host prunes a vault under a reader: a point is read as it is."""
        return NoKeeper()

    def isolated(self) -> AbstractContextManager["Vault"]:
        return nullcontext(self)   # no page of ours to crash on: every read is checked

    # -- what the vault holds --------------------------------------------------------------------
    def index(self, fresh: bool = False) -> dict[tuple[bytes, bytes], Location]:
        """(kind, id) -> where it is, from every pack's index (read once per opened vault, or again if fresh)."""
        index = self._index   # replaced whole, never changed in place but by this handle's push: no lock to read
        if index is not None and not fresh:
            return index
        with self._index_lock:
            if self._index is None or fresh:
                names = self.objects.indexed_packs()
                found: dict[tuple[bytes, bytes], Location] = {}
                with ThreadPoolExecutor(INDEX_READERS) as pool:
                    for pack, entries in zip(names, pool.map(self._read_index, names)):
                        found.update((key, Location(pack, offset, length)) for key, offset, length in entries)
                self._index, self._index_read = found, time.monotonic()
                self._index_copies.keep_only(set(names))
            return self._index

    def condemned(self) -> Condemned | None:
        """gc's record of the packs it condemned (layout.py, gc.py), or None if there is none. Raises
        CorruptBlockError if it does not open (damaged, forged, or written unsealed by an older rpfs)."""
        raw = self.objects.condemned()
        return None if raw is None else Condemned.decode(self.keyring, self.config.label, raw)

    def put_condemned(self, record: Condemned) -> None:
        self.objects.put_condemned(record.encode(self.keyring))

    def _condemned_index(self) -> dict[tuple[bytes, bytes], Location]:
        """The entries of the packs gc/condemned lists (for reads only: a push must never rely on them)."""
        try:
            packs = (self.condemned() or Condemned({})).packs
        except CorruptBlockError:
            return {}
        found = {}
        for pack, sealed in packs.items():
            if sealed:
                found.update((key, Location(pack, offset, length))
                             for key, offset, length in self.index_entries(pack, base64.b64decode(sealed)))
        return found

    def _read_index(self, pack: str) -> list[tuple[tuple[bytes, bytes], int, int]]:
        """A listed pack's index: from the local copy if it opens (index_cache.py), else by a GET (and kept)."""
        copy = self._index_copies.get(pack)
        if copy is not None:
            try:
                return self.index_entries(pack, copy)
            except (RpfsError, CorruptBlockError):
                pass   # a damaged or changed copy: fetched again
        sealed = self.objects.index(pack)
        if sealed is None:
            return []   # removed meanwhile (gc): its pack is going too
        entries = self.index_entries(pack, sealed)
        self._index_copies.put(pack, sealed)
        return entries

    def index_entries(self, pack: str, sealed: bytes) -> list[tuple[tuple[bytes, bytes], int, int]]:
        """A pack's index object opened: ((kind, id), offset, length) per entry."""
        data = self._unseal(b"vault-index\0" + pack.encode(), sealed, f"the index of pack {pack}")
        if len(data) % ENTRY.size:
            raise RpfsError(f"{self.config.label}: the index of pack {pack} is damaged")
        return [((kind, entry_id), offset, length) for kind, entry_id, offset, length in ENTRY.iter_unpack(data)]

    def seal_index(self, pack: str, entries: Iterable[tuple[bytes, bytes, int, int]]) -> bytes:
        return self.keyring.seal_record(b"".join(ENTRY.pack(*e) for e in entries), b"vault-index\0" + pack.encode())

    def add_index(self, pack: str, entries: list[tuple[bytes, bytes, int, int]]) -> None:
        """Index a pack this handle uploaded whole (push): its entries count as held from now on."""
        sealed = self.seal_index(pack, entries)
        self.objects.put_index(pack, sealed)
        self._index_copies.put(pack, sealed)
        index = self.index()
        with self._index_lock:
            index.update(((kind, entry_id), Location(pack, offset, length))
                         for kind, entry_id, offset, length in entries)

    def has(self, kind: bytes, entry_id: bytes) -> bool:
        return (kind, entry_id) in self.index()

    # -- recovery points -------------------------------------------------------------------------
    def point_names(self, fresh: bool = False) -> list[tuple[str, str]]:
        """(vm, point id) of every manifest, oldest first per VM (ids sort by time); one listing serves
        the calls of the next LISTING_SECONDS (a mount asks for each lookup) unless fresh."""
        with self._index_lock:
            listed, names = self._listing
        if time.monotonic() - listed < LISTING_SECONDS and not fresh:
            return names
        found = self.objects.point_names()
        with self._index_lock:
            self._listing = (time.monotonic(), found)
        return found

    def stored_bytes(self) -> int:
        """Bytes of every blob and piece the vault's indexes name."""
        return sum(location.length for location in self.index().values())

    def vms(self) -> list[str]:
        return sorted({vm for vm, _id in self.point_names()})

    def point_ids(self, vm: str) -> list[str]:
        return [point_id for v, point_id in self.point_names() if v == vm]

    def has_point(self, vm: str, point_id: str) -> bool:
        return (vm, point_id) in self.point_names()

    def latest_point_id(self, vm: str) -> str | None:
        ids = self.point_ids(vm)
        return ids[-1] if ids else None

    def points(self, vm: str | None = None) -> list[RecoveryPoint]:
        names = [(v, p) for v, p in self.point_names() if vm is None or v == vm]
        with ThreadPoolExecutor(INDEX_READERS) as pool:
            return [point for point in pool.map(lambda name: self._manifest(*name)[0], names) if point is not None]

    def point(self, vm: str, point_id: str | None = None) -> RecoveryPoint:
        """One recovery point by id, or the VM's latest (None or 'latest'), as Store.point."""
        held = self._held.get(point_object(vm, point_id or ""))
        if held is not None:
            return held[0]
        ids = self.point_ids(vm)
        wanted = (ids[-1] if ids else None) if point_id in (None, "latest") else point_id
        if wanted in ids:
            point = self._manifest(vm, wanted)[0]
            if point is not None:
                return point
        if not ids:
            raise RpfsError(f"unknown VM {vm!r} in {self.config.label} (VMs: {', '.join(self.vms()) or 'none'})")
        raise RpfsError(f"VM {vm!r} has no recovery point {point_id!r} in {self.config.label} (latest: {ids[-1]})")

    def manifest_maps(self, vm: str, point_id: str) -> dict[str, tuple[int, list[bytes]]]:
        """disk -> (block count, piece ids) of a recovery point in the vault ({} if it has gone)."""
        return self._manifest(vm, point_id)[1]

    def delete_point(self, vm: str, point_id: str) -> None:
        """Remove a recovery point from the vault (its manifest, then its catalog: one left by a kill in
        between is removed by gc): gc frees what nothing else needs."""
        self.objects.delete_manifest(vm, point_id)
        self._manifests.pop(point_object(vm, point_id), None)
        self._listing = (-LISTING_SECONDS, [])
        self.objects.delete_catalog(vm, point_id)
        self._catalogs.pop(catalog_object(vm, point_id), None)

    # -- catalogs of the files inside the disks (store/catalogs.py; a CatalogReader) -----------------
    def catalog(self, vm: str, point_id: str) -> Catalog | None:
        """The point's catalog record, None when the vault holds none for it (kept once read)."""
        name = catalog_object(vm, point_id)
        with self._listings_lock:
            if name in self._catalogs:
                found = self._catalogs[name]
                return None if found is None else found.catalog
        found = self.catalog_object(vm, point_id)
        with self._listings_lock:
            self._catalogs[name] = found
            while len(self._catalogs) > 256:
                self._catalogs.popitem(last=False)
        return None if found is None else found.catalog

    def catalog_object(self, vm: str, point_id: str) -> CatalogObject | None:
        """The point's catalog object as it is now (read every time: push and gc), None if there is none;
        CorruptBlockError if it does not open."""
        sealed = self.objects.catalog(vm, point_id)
        return None if sealed is None else CatalogObject.decode(self.keyring, self.config.label, vm, point_id, sealed)

    def catalog_keys(self) -> list[tuple[str, str]]:
        """(vm, point id) of every catalog object."""
        return self.objects.catalog_names()

    def listing(self, listing_id: bytes, where: str) -> list[Entry]:
        return decode_listing(self.listing_bytes(listing_id, where), f"a listing of {where}")

    def listing_bytes(self, listing_id: bytes, where: str) -> bytes:
        """A listing's canonical bytes, fetched through the index and checked against its id;
        CorruptBlockError naming where if it is missing or damaged."""
        with self._listings_lock:
            raw = self._listings.get(listing_id)
            if raw is not None:
                self._listings.move_to_end(listing_id)
                return raw
        stored = self._located(LISTING, listing_id,
                               lambda location: bytes(self._listing_runs.read((LISTING, listing_id), location)))
        if stored is None:
            raise CorruptBlockError(f"a listing of {where} is missing from {self.config.label}"
                                    f" ({listing_id.hex()[:16]})")
        raw = self._open_listing(listing_id, stored, where)
        with self._listings_lock:
            if listing_id not in self._listings:
                self._listings[listing_id] = raw
                self._listings_bytes += len(raw)
            while self._listings_bytes > LISTINGS_KEPT and len(self._listings) > 1:
                self._listings_bytes -= len(self._listings.popitem(last=False)[1])
        return raw

    def listing_id(self, raw: bytes) -> bytes:
        return self.codec.block_id(raw)

    def seal_listing(self, listing_id: bytes, raw: bytes) -> bytes:
        """A listing as the vault keeps it (as the store does: compressed, sealed under its id)."""
        compressor = getattr(self._zstd, "compressor", None)
        if compressor is None:
            compressor = self._zstd.compressor = zstandard.ZstdCompressor(level=3)
        return self.keyring.seal_record(compressor.compress(raw), b"listings\0" + listing_id)

    def _open_listing(self, listing_id: bytes, stored: bytes, where: str) -> bytes:
        compressed = self._unseal(b"listings\0" + listing_id, stored, f"a listing of {where}")
        return open_listing(compressed, listing_id, self.codec.block_id, where)

    def _manifest(self, vm: str, point_id: str) -> tuple[RecoveryPoint | None, dict]:
        """A manifest's recovery point and block map indexes (disk -> (count, piece ids)), kept once read."""
        name = point_object(vm, point_id)
        found = self._manifests.get(name) or self._held.get(name)
        if found is not None:
            return found
        sealed = self.objects.manifest(vm, point_id)
        if sealed is None:
            return None, {}
        self._manifests[name] = found = self._open_manifest(vm, point_id, sealed)
        while len(self._manifests) > 256:
            self._manifests.popitem(last=False)
        return found

    def _open_manifest(self, vm: str, point_id: str, sealed: bytes) -> tuple[RecoveryPoint, dict]:
        manifest = Manifest.decode(self.keyring, self.config.label, vm, point_id, sealed)
        return manifest.point, manifest.maps

    # -- holds: recovery points an instant restore still copies -----------------------------------
    def hold(self, name: str, vm: str, point_id: str, target: Path | str) -> bool:
        """Claim a point for an instant restore: prune skips it and gc keeps what it needs (gc.py reads a
        hold's manifest as a manifest) until release_hold. Checked again once written: a point pruned
        before that may already have lost its packs, and is refused. True: always written anew."""
        sealed = self.objects.manifest(vm, point_id)
        if sealed is not None:
            self.objects.put_hold(name, json.dumps({"vm": vm, "point": point_id, "target": str(target),
                                                    "manifest": base64.b64encode(sealed).decode()}).encode())
            if self.objects.manifest(vm, point_id) is not None:
                return True
            self.release_hold(name)
        raise RpfsError(f"recovery point {vm}/{point_id} no longer exists in {self.config.label} (just pruned)")

    def release_hold(self, name: str) -> None:
        self.objects.delete_hold(name)

    def holds(self) -> list[Hold]:
        """Every hold in the vault (a damaged one stops the caller: what it keeps cannot be known)."""
        found = []
        for object_name in self.objects.hold_objects():
            hold = self._hold(object_name)
            if hold is not None:   # else released meanwhile
                found.append(hold)
        return found

    def _hold(self, object_name: str) -> Hold | None:
        raw = self.objects.hold(object_name)
        if raw is None:
            return None
        try:
            record = parse_json(raw)
            return Hold(hold_name(object_name), str(record["vm"]), str(record["point"]), str(record["target"]),
                        base64.b64decode(record["manifest"]))
        except (ValueError, KeyError, TypeError):
            raise RpfsError(f"{self.config.label}: {object_name} is damaged; nothing was changed (delete it if no"
                            " instant restore from this vault is unfinished)") from None

    def held_maps(self, hold: Hold) -> dict[str, tuple[int, list[bytes]]]:
        """disk -> (block count, piece ids) of a held point, from the hold's own copy of its manifest."""
        return self._open_manifest(hold.vm, hold.point_id, hold.manifest)[1]

    def adopt_hold(self, name: str) -> None:
        """Read the held point from the hold's manifest from now on, whether or not prune deleted its own."""
        hold = self._hold(hold_object(name))
        if hold is None:
            raise RpfsError(f"{self.config.label} has no hold {name} (the instant restore was discarded?)")
        self._held[point_object(hold.vm, hold.point_id)] = self._open_manifest(hold.vm, hold.point_id, hold.manifest)

    # -- the image read path (as Store: serve/image.py) ------------------------------------------
    @staticmethod
    def map_key(vm: str, point_id: str, disk: str) -> bytes:
        return Store.map_key(vm, point_id, disk)

    def block_digest(self, map_key: bytes, index: int) -> bytes:
        return self._pieces.digest(map_key, index, self.map_piece)

    def map_piece(self, map_key: bytes, number: int) -> bytes:
        vm, point_id, disk = map_key.decode().split("\0")
        _point, maps = self._manifest(vm, point_id)
        if disk not in maps:
            raise RpfsError(f"block map missing for {where(map_key)} in {self.config.label}")
        _block_count, ids = maps[disk]
        if number >= len(ids):
            raise RpfsError(f"block {number * 1024} is beyond the block map of {where(map_key)}")
        return self.piece(ids[number], map_key)

    def block_map(self, map_key: bytes) -> bytes:
        """A whole block map, every piece checked (verify)."""
        vm, point_id, disk = map_key.decode().split("\0")
        count, ids = self.manifest_maps(vm, point_id).get(disk, (0, []))
        block_map = b"".join(self.piece(piece_id, map_key) for piece_id in ids)
        if len(block_map) != count * DIGEST_SIZE:
            raise CorruptBlockError(f"the block map of {where(map_key)} in {self.config.label} has"
                                    f" {len(block_map) // DIGEST_SIZE} entries, its manifest says {count}")
        return block_map

    def piece(self, piece_id: bytes, map_key: bytes | None = None) -> bytes:
        """A block map piece by id, authenticated and checked against its id."""
        of = f" of the block map of {where(map_key)}" if map_key else ""
        stored = self._fetch(PIECE, piece_id)
        if stored is None:
            raise CorruptBlockError(f"a piece{of} is missing from {self.config.label} ({piece_id.hex()[:16]})")
        return self._open_piece(piece_id, stored, of)

    def _open_piece(self, piece_id: bytes, stored: bytes, of: str = "") -> bytes:
        piece = self._unseal(b"pieces\0" + piece_id, stored, f"a piece{of}")
        if self.codec.block_id(piece) != piece_id:
            raise CorruptBlockError(f"a piece{of} does not match its id ({piece_id.hex()[:16]})")
        return piece

    def read_checked(self, kind: bytes, entry_id: bytes, location: Location) -> bytes:
        """An entry's bytes as stored, at a known place, checked whole (gc copies it into a new pack: a
        damaged one must not be copied as if it were good). Raises CorruptBlockError."""
        data = self._read_pack(location.pack, location.offset, location.length)
        if kind == PIECE:
            self._open_piece(entry_id, data)
        elif kind == LISTING:
            self._open_listing(entry_id, data, f"pack {location.pack}")
        else:
            try:
                self.codec.decode(entry_id, data)
            except CorruptBlockError as e:
                raise CorruptBlockError(f"block {entry_id.hex()} in pack {location.pack}: {e.message}") from None
        return data

    def get_blob(self, digest: bytes, decode: Callable[[memoryview], T] = bytes,
                 part: tuple[int, int] | None = None) -> T | None:
        """A blob by ranged GETs of its pack, passed through decode (which checks it), or None if the vault
        has none. A whole blob comes with the blobs after it in its pack (runs.py: a reader going through a
        disk asks for them next); part (start, stop of the block) fetches only the frames it lies in."""
        if part is not None:
            found = self._cut(digest, *part)
            return None if found is None else decode(found)
        data = self._fetch(BLOB, digest, in_runs=True)
        return None if data is None else decode(memoryview(data))

    def _cut(self, digest: bytes, start: int, stop: int) -> Cut | bytes | None:
        """What bytes [start, stop) of a block need of its blob (blob.Cut): its header and frame table (kept
        for the next read of that block), then one ranged GET of the frames they lie in."""
        return self._located(BLOB, digest, lambda location: self._cut_at(location, digest, start, stop))

    def _cut_at(self, location: Location, digest: bytes, start: int, stop: int) -> Cut | bytes:
        with self._heads_lock:   # heads by place, not by id: another copy of a block is sealed anew
            head = self._heads.get((location.pack, location.offset))
        if head is None:
            head = self._read_pack(location.pack, location.offset, min(location.length, HEAD_BYTES))
            needed = head_size(head)
            if needed is None:   # not in frames (a block of format 3): read whole
                return self._read_pack(location.pack, location.offset, location.length)
            if len(head) < needed <= location.length:
                head = self._read_pack(location.pack, location.offset, needed)
            head = bytes(head[:needed])
            with self._heads_lock:
                self._heads[(location.pack, location.offset)] = head
                while len(self._heads) > HEADS_KEPT:
                    self._heads.popitem(last=False)
        span = frame_span(head, start, stop)
        if span is None:
            return self._read_pack(location.pack, location.offset, location.length)
        _size, first, at, length = span
        if at + length > location.length:
            raise CorruptBlockError(f"block {digest.hex()}: its frame table points past its blob")
        frames = self._read_pack(location.pack, location.offset + at, length) if length else b""
        return Cut(head, first, frames)

    def _locate(self, kind: bytes, entry_id: bytes) -> Location | None:
        """Where an entry lies; None if no index names it. An entry missing from the index read at open (a
        long mount) is looked up again in a fresh one, then among the packs a gc condemned (their indexes
        hidden until the next gc rescues or deletes them: readers may still use them)."""
        location = self.index().get((kind, entry_id))
        if location is None and time.monotonic() - self._index_read > LISTING_SECONDS:
            location = self.index(fresh=True).get((kind, entry_id))
        if location is None:
            location = self._condemned_index().get((kind, entry_id))
        return location

    def _fetch(self, kind: bytes, entry_id: bytes, in_runs: bool = False) -> bytes | None:
        """An entry's bytes by a ranged GET (in a run: runs.py); None if no index names it."""
        if in_runs:
            return self._located(kind, entry_id, lambda location: self._runs.read((kind, entry_id), location))
        return self._located(kind, entry_id, lambda location: self._read_pack(location.pack, location.offset,
                                                                              location.length))

    def _located(self, kind: bytes, entry_id: bytes, read: Callable[[Location], T]) -> T | None:
        """read(where the entry lies), None if no index names it. If its pack has gone since this handle read
        the index (a long mount or instant restore: gc repacked the entry, then deleted the old pack), the
        entry is looked up once more and read where it is now."""
        location = self._locate(kind, entry_id)
        if location is None:
            return None
        try:
            return read(location)
        except PackMissing:
            moved = self.index(fresh=True).get((kind, entry_id)) or self._condemned_index().get((kind, entry_id))
            if moved is None or moved == location:
                raise
            return read(moved)

    def _read_pack(self, pack: str, offset: int, length: int) -> bytes:
        data = self.objects.read_pack(pack, offset, length)
        if data is None:
            raise PackMissing(f"pack {pack} is missing from {self.config.label}")
        return data

    def _unseal(self, associated: bytes, sealed: bytes, what: str) -> bytes:
        return unseal(self.keyring, self.config.label, associated, sealed, what)


def vault_version_for(store: Store) -> int:
    """The vault version whose readers read every blob of store: 2 once blobs may have keys of their own."""
    return BLOCK_KEYS_VERSION if store.format_version >= BLOCK_KEYS_STORE_FORMAT else 1


def bucket_of(config: VaultConfig) -> Bucket | FolderBucket:
    """The vault's bucket: on S3, or a local folder for an endpoint file:///folder (tests and experiments)."""
    kind = FolderBucket if config.endpoint.startswith("file:") else Bucket
    return kind(config.label, config.endpoint, config.bucket, config.prefix)


def probe(config: VaultConfig, bucket: Bucket | None = None) -> dict:
    """The format record of the vault in config's bucket (no key needed), refused if there is none."""
    settings = _settings(bucket or bucket_of(config))
    if settings is None:
        raise RpfsError(f"{config.label}: bucket {config.bucket} at {config.endpoint} holds no rpfs vault"
                        " (rpfs vault add with --store makes one from a store)")
    return settings


def has_hold(vault_name: str, name: str) -> bool:
    """Whether this machine holds a point under that name (no key needed: discard)."""
    wanted = hold_object(name)
    return any(found == wanted for found, _size in bucket_of(vault_config(vault_name)).names(wanted))


def release_hold(vault_name: str, name: str) -> None:
    """Release this machine's hold knowing only the vault's name (no key needed: instant-stop, discard)."""
    VaultObjects(bucket_of(vault_config(vault_name))).delete_hold(name)


def upload_key_slots(bucket: Bucket, slots: list[KeySlot]) -> None:
    VaultObjects(bucket).put_key_slots(json.dumps([json.loads(slot.to_json()) for slot in slots], indent=2).encode())


def _settings(bucket: Bucket) -> dict | None:
    """The vault's format record, checked; None if the bucket holds no vault."""
    raw = VaultObjects(bucket).format_record()
    if raw is None:
        return None
    try:
        settings = parse_json(raw)
        version = int(settings["format_version"]) if settings["format"] == FORMAT else None
        bytes.fromhex(settings["store_id"]), bytes.fromhex(settings["key_check"])   # what every use needs
        int(settings["block_size"]), int(settings["zstd_level"])
        if not all(isinstance(settings[name], str) for name in ("created", "encryption", "block_id")):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        version = None
    if version is None:
        raise RpfsError(f"{bucket.label}: {FORMAT_OBJECT} in bucket {bucket.name} is not an rpfs vault's format"
                        " record (damaged, or another program's); nothing was changed")
    if version not in READ_VERSIONS:
        raise RpfsError(f"{bucket.label} has vault format version {version}; this rpfs reads versions"
                        f" {READ_VERSIONS[0]} to {FORMAT_VERSION} (use a matching rpfs release)")
    return settings
