"""Catalogs (format 7): the files inside a recovery point's disks, as content-addressed folder listings.

A catalog says, for each filesystem of each disk of a point, what it held: one *listing* per folder (its
entries' names, kinds, sizes, modes, owners, mtimes, link targets, and for a subfolder the id of its own
listing). A listing is stored once, under its id (the store's block id function of its bytes), so an
unchanged folder is shared by every point that has it, as restic's tree blobs are; a point keeps only its
catalog record (`catalogs`): per filesystem its status and the id of its root listing. Counted as block
map pieces are:
  listing_refs  listing id -> how many references name it: catalog records' roots and stored listings'
                subfolder entries (each occurrence once)
so storing a new listing counts its subfolders, and releasing a listing no one names any more releases its
subfolders in turn. Listings and records are sealed in an encrypted store, and a listing read is checked
against its id: a damaged catalog is an error naming the point, never a shorter answer.
The format and its invariants: docs/design/catalog.md.
"""
from __future__ import annotations

import json
import struct
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import zstandard

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.store.crypto import Keyring, seal_in, unseal_in

LISTING_VERSION = 1
CATALOG_VERSION = 1
MAX_LISTING_BYTES = 1 << 30         # a decompressed listing larger than this is damage, not a folder
REF = struct.Struct("<I")
KINDS = {"f": "file", "d": "folder", "l": "link", "c": "character device", "b": "block device",
         "p": "fifo", "s": "socket"}
CATALOGED = "cataloged"


@dataclass(frozen=True)
class Entry:
    """One name in a folder, as the guest's filesystem had it. Names and link targets are the guest's
    bytes decoded with os.fsdecode (undecodable bytes as surrogate escapes), so they round-trip exactly."""

    name: str
    kind: str             # a key of KINDS
    size: int
    mode: int             # permission bits and set-id bits (st_mode & 0o7777)
    uid: int
    gid: int
    mtime_ns: int
    target: str = ""      # a link's target
    folder: bytes = b""   # a folder's listing id


@dataclass
class CatalogedFilesystem:
    """One filesystem of a disk (a partition, or the whole disk): cataloged, or why not."""

    disk: str
    name: str                   # as attach names it: "disk" or "p<N>"
    partition: int | None
    fstype: str | None
    status: str                 # CATALOGED, or why it could not be read ("no filesystem found", "swap", ...)
    root: str = ""              # the root listing's id, hex
    files: int = 0              # entries that are not folders
    folders: int = 0
    bytes: int = 0              # the sizes of its files

    @property
    def label(self) -> str:
        """How paths name it: disk/p1."""
        return f"{self.disk}/{self.name}"


@dataclass
class Catalog:
    """A point's catalog record."""

    vm: str
    point_id: str
    made: str                   # ISO 8601, UTC
    filesystems: list[CatalogedFilesystem] = field(default_factory=list)

    def roots(self) -> list[bytes]:
        return [bytes.fromhex(fs.root) for fs in self.filesystems if fs.root]

    def to_json(self) -> bytes:
        return json.dumps({"version": CATALOG_VERSION, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "Catalog":
        try:
            record = json.loads(raw)
            if record.get("version") != CATALOG_VERSION:
                raise RpfsError(f"the catalog of {where} has version {record.get('version')}; this rpfs reads"
                                f" version {CATALOG_VERSION} (use a matching rpfs release, or rpfs catalog again)")
            filesystems = [CatalogedFilesystem(**fs) for fs in record["filesystems"]]
            for fs in filesystems:
                if fs.root:
                    bytes.fromhex(fs.root)
            return cls(record["vm"], record["point_id"], record["made"], filesystems)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptBlockError(f"the catalog of {where} is damaged ({e})") from None


def encode_listing(entries: list[Entry]) -> bytes:
    """The canonical bytes of a folder's listing (its id is the block id of these): entries by name."""
    rows = [[e.name, e.kind, e.size, e.mode, e.uid, e.gid, e.mtime_ns, e.target, e.folder.hex()]
            for e in sorted(entries, key=lambda e: e.name)]
    return json.dumps([LISTING_VERSION, rows], separators=(",", ":")).encode()


def decode_listing(raw: bytes, what: str) -> list[Entry]:
    return [entry_of(row, what) for row in listing_rows(raw, what)]


def listing_rows(raw: bytes, what: str) -> list[list]:
    """A listing's rows as encode_listing wrote them (name, kind, size, mode, uid, gid, mtime_ns, target,
    folder id in hex), each of nine fields. A search across many folders reads names and kinds from these
    and makes an Entry (entry_of) only of what it matches: most rows are never more than looked at."""
    try:
        version, rows = json.loads(raw)
        if version != LISTING_VERSION:
            raise ValueError(f"listing version {version}")
        if not set(map(len, rows)) <= {9}:
            raise ValueError("a row without its nine fields")
        return rows
    except (ValueError, TypeError) as e:
        raise CorruptBlockError(f"{what} is damaged ({e})") from None


def entry_of(row: list, what: str) -> Entry:
    """The Entry of one row of listing_rows."""
    try:
        return Entry(*row[:8], folder=bytes.fromhex(row[8]))
    except (ValueError, TypeError) as e:
        raise CorruptBlockError(f"{what} is damaged ({e})") from None


def subfolders(raw: bytes, what: str) -> list[bytes]:
    """The listing ids a listing names, each occurrence."""
    return [e.folder for e in decode_listing(raw, what) if e.folder]


class ListingMissing(RpfsError):
    """A catalog to store names a listing the store no longer has (it reused the listings of a point that
    was pruned while it was made)."""


class CatalogReader(Protocol):
    """Where catalogs are read from: a store (Store) or a vault (Vault)."""

    def catalog(self, vm: str, point_id: str) -> Catalog | None:
        """The point's catalog record, None when the point has none."""

    def listing(self, listing_id: bytes, where: str) -> list[Entry]:
        """A listing by id, checked against its id; CorruptBlockError (naming `where`) if damaged or missing."""

    def listing_bytes(self, listing_id: bytes, where: str) -> bytes:
        """The same listing's canonical bytes (for listing_rows)."""


@dataclass(frozen=True)
class RefRepair:
    """What check --repair's recount changed."""

    recounted: int   # listings whose count was wrong (or counted but unnamed)
    removed: int     # stored listings no record reaches, removed


class Catalogs:
    """The catalog layout on the databases of an open store; every call runs in the caller's transaction."""

    def __init__(self, dbs: dict, block_id: Callable[[bytes], bytes], keyring: Keyring | None):
        self._records, self._listings, self._refs = dbs["catalogs"], dbs["listings"], dbs["listing_refs"]
        self._block_id, self._keyring = block_id, keyring
        self._compressor = zstandard.ZstdCompressor(level=3)

    def listing_id(self, raw: bytes) -> bytes:
        return self._block_id(raw)

    # -- writing -------------------------------------------------------------------------------------
    def put(self, txn, point_key: bytes, catalog: Catalog, listings: dict[bytes, bytes]) -> int:
        """Store a point's catalog (replacing one it had): the listings the store lacks, the record, and the
        counts. listings holds every listing the catalog names by id (those already stored are skipped).
        Returns the bytes of listings stored anew."""
        added = 0
        for listing_id, raw in listings.items():
            if txn.get(listing_id, db=self._listings) is not None:
                continue
            txn.put(listing_id, self._seal(b"listings", listing_id, self._compressor.compress(raw)), db=self._listings)
            added += len(raw)
            if txn.get(listing_id, db=self._refs) is not None:   # counted but lost (damage): stored again,
                continue                                        # its subfolders were counted then
            for child in subfolders(raw, "a new listing"):
                self._bump(txn, child, +1)
        for root in catalog.roots():   # counted before the old record is released: what both name stays
            if txn.get(root, db=self._listings) is None:
                raise ListingMissing(f"catalog of {catalog.vm}/{catalog.point_id}: a listing it names is not stored"
                                     " (its point was pruned meanwhile); rpfs catalog makes it again")
            self._bump(txn, root, +1)
        self.delete(txn, point_key)
        txn.put(point_key, self._seal(b"catalogs", point_key, catalog.to_json()), db=self._records)
        return added

    def delete(self, txn, point_key: bytes) -> int:
        """Remove a point's catalog record, releasing its listings; returns how many listings went. A
        listing that cannot be read keeps its subfolders counted (rpfs check recounts): nothing is freed on
        a guess."""
        stored = txn.get(point_key, db=self._records)
        if stored is None:
            return 0
        try:
            roots = self._record(point_key, stored).roots()
        except (CorruptBlockError, RpfsError):
            roots = []
        txn.delete(point_key, db=self._records)
        removed, pending = 0, list(roots)
        while pending:
            listing_id = pending.pop()
            if self._bump(txn, listing_id, -1) > 0:
                continue
            try:
                pending.extend(subfolders(self._listing(txn, listing_id, "a released listing"), "a released listing"))
            except CorruptBlockError:
                pass
            removed += bool(txn.delete(listing_id, db=self._listings))
        return removed

    def repair_refs(self, txn) -> RefRepair | None:
        """check --repair: set listing_refs from a recount of the records and listings as this (write)
        transaction sees them, and remove the listings no record reaches. Recounted and replaced in one
        transaction, so a catalog stored beside it is wholly counted or not yet there: never half. None,
        and nothing changed, while a record or a listing one reaches is damaged (check names it first)."""
        records = []
        for key in self.record_keys(txn):
            try:
                record = self.record(txn, key) if b"\0" in key else None
            except (CorruptBlockError, RpfsError):
                record = None
            if record is None:
                return None
            records.append(record)
        try:
            counts = count_references(records, lambda listing_id: self._listing(txn, listing_id, "a listing"))
        except (CorruptBlockError, RpfsError):
            return None
        before = self.ref_counts(txn)
        txn.drop(self._refs, delete=False)
        for listing_id, count in sorted(counts.items()):
            txn.put(listing_id, REF.pack(count), db=self._refs)
        gone = [listing_id for listing_id in self.listing_ids(txn) if listing_id not in counts]
        for listing_id in gone:
            txn.delete(listing_id, db=self._listings)
        return RefRepair(sum(before.get(i) != counts.get(i) for i in before.keys() | counts.keys()), len(gone))

    # -- reading -------------------------------------------------------------------------------------
    def record(self, txn, point_key: bytes) -> Catalog | None:
        stored = txn.get(point_key, db=self._records)
        return None if stored is None else self._record(point_key, stored)

    def listing(self, txn, listing_id: bytes, where: str) -> bytes:
        """A listing's canonical bytes, checked against its id."""
        return self._listing(txn, listing_id, where)

    def record_keys(self, txn) -> list[bytes]:
        return [bytes(k) for k in txn.cursor(db=self._records).iternext(values=False)]

    def listing_ids(self, txn) -> list[bytes]:
        return [bytes(key) for key in txn.cursor(db=self._listings).iternext(values=False)]

    def stored_bytes(self, txn) -> int:
        """The bytes catalogs take as stored: records and listings (sealed, compressed)."""
        return sum(len(v) for db in (self._records, self._listings) for _k, v in txn.cursor(db=db))

    def ref_counts(self, txn) -> dict[bytes, int]:
        return {bytes(k): REF.unpack(v)[0] for k, v in txn.cursor(db=self._refs)}

    def _record(self, point_key: bytes, stored) -> Catalog:
        where = point_key.decode(errors="replace").replace("\0", "/")
        return Catalog.from_json(bytes(self._unseal(b"catalogs", point_key, stored, f"the catalog of {where}")), where)

    def _listing(self, txn, listing_id: bytes, where: str) -> bytes:
        stored = txn.get(listing_id, db=self._listings)
        if stored is None:
            raise CorruptBlockError(f"a listing of {where} is missing ({listing_id.hex()[:16]})")
        sealed = self._unseal(b"listings", listing_id, stored, f"a listing of {where}")
        return open_listing(sealed, listing_id, self._block_id, where)

    def _bump(self, txn, listing_id: bytes, by: int) -> int:
        count = txn.get(listing_id, db=self._refs)
        value = max(0, (REF.unpack(count)[0] if count is not None else 0) + by)
        if value:
            txn.put(listing_id, REF.pack(value), db=self._refs)
        else:
            txn.delete(listing_id, db=self._refs)
        return value

    def _seal(self, db: bytes, key: bytes, value: bytes) -> bytes:
        return seal_in(self._keyring, db, key, value)

    def _unseal(self, db: bytes, key: bytes, value, what: str):
        return unseal_in(self._keyring, db, key, value, what)


class CatalogView:
    """The catalogs as one read transaction sees them (rpfs check): records, listings, counts and stored
    listing ids of one moment, so a catalog stored meanwhile is in all of them or in none (never a listing
    read before its record, looking unreachable). Valid only inside Store.catalog_view()."""

    def __init__(self, catalogs: Catalogs, txn, point_key: Callable[[str, str], bytes]):
        self._catalogs, self._txn, self._point_key = catalogs, txn, point_key

    def keys(self) -> list[tuple[str, ...]]:
        """(vm, point id) of every record; a damaged key has fewer parts."""
        return [tuple(k.decode(errors="replace").split("\0", 1)) for k in self._catalogs.record_keys(self._txn)]

    def record(self, vm: str, point_id: str) -> Catalog | None:
        return self._catalogs.record(self._txn, self._point_key(vm, point_id))

    def listing_bytes(self, listing_id: bytes, where: str) -> bytes:
        return self._catalogs.listing(self._txn, listing_id, where)

    def ref_counts(self) -> dict[bytes, int]:
        return self._catalogs.ref_counts(self._txn)

    def listing_ids(self) -> list[bytes]:
        return self._catalogs.listing_ids(self._txn)


_per_thread = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (a zstd context serves one thread at a time), made once: making one costs
    more than decompressing a small listing (a find across 100 points reads thousands)."""
    found = getattr(_per_thread, "decompressor", None)
    if found is None:
        found = _per_thread.decompressor = zstandard.ZstdDecompressor()
    return found


def open_listing(compressed, listing_id: bytes, block_id: Callable[[bytes], bytes], where: str) -> bytes:
    """A stored listing's canonical bytes (unsealed already), checked against its id."""
    try:
        raw = _decompressor().decompress(bytes(compressed), max_output_size=MAX_LISTING_BYTES)
    except zstandard.ZstdError:
        raise CorruptBlockError(f"a listing of {where} is damaged ({listing_id.hex()[:16]})") from None
    if block_id(raw) != listing_id:
        raise CorruptBlockError(f"a listing of {where} does not match its id ({listing_id.hex()[:16]})")
    return raw


def count_references(records: list[Catalog], listing: Callable[[bytes], bytes]) -> dict[bytes, int]:
    """What listing_refs should hold, recounted from the records (for check): each root once per record,
    each stored listing's subfolders once per occurrence, every reachable listing read once."""
    counts: dict[bytes, int] = {}
    seen: set[bytes] = set()
    pending: list[bytes] = []
    for record in records:
        for root in record.roots():
            counts[root] = counts.get(root, 0) + 1
            pending.append(root)
    while pending:
        listing_id = pending.pop()
        if listing_id in seen:
            continue
        seen.add(listing_id)
        for child in subfolders(listing(listing_id), "a listing"):
            counts[child] = counts.get(child, 0) + 1
            pending.append(child)
    return counts
