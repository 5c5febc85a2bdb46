"""Pushing recovery points to a vault: only what it lacks goes up, packed, and a point appears only whole.

For each recovery point (oldest first), the blobs its block maps name that the vault lacks, then its new
map pieces, are streamed into packs of about PACK_BYTES: each pack is one object uploaded in parts, in
parallel (s3.py), and exists only once complete; its index goes up after it. The point's manifest goes
up last. A push killed at any moment leaves packs (whole, indexed or not) and no half point: the next
push finds the indexed packs' blobs in the vault and sends only the rest.

A point with a catalog in the store (store/catalogs.py) also sends the listings its catalog reaches that
the vault lacks, in the same packs, and after its manifest a catalog object naming every listing it
reaches (layout.py): it exists only once they are all indexed. A point the vault already has gets its
catalog object when the vault has none, one that differs from the store's (cataloged again), or one
naming a listing the vault's index lacks, its listings in packs of their own first.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.libc import reuse_freed_memory
from rpfs.host.threads import in_order
from rpfs.store.block_maps import digests_in_order
from rpfs.store.catalogs import Catalog, subfolders
from rpfs.store.leases import Lease
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import Store
from rpfs.vault.keys import send_current_slots
from rpfs.vault.locks import VaultLock
from rpfs.vault.packs import PACK_BYTES, PackStream, upload_packs
from rpfs.vault.layout import CatalogObject, Manifest
from rpfs.vault.vault import BLOB, CATALOGS_VERSION, INDEX_READERS, LISTING, PIECE, Vault

CHECKERS = 2            # threads reading and checking blobs ahead of the upload (page faults, zstd, AES, BLAKE3)

ProgressFn = Callable[[int, int], None]


@dataclass
class PushSummary:
    pushed: list[str] = field(default_factory=list)      # "vm/id" of the points uploaded
    already: list[str] = field(default_factory=list)     # in the vault, or older than the VM's newest there
    blobs: int = 0
    pieces: int = 0
    listings: int = 0                                     # catalog listings uploaded
    catalogs: list[str] = field(default_factory=list)    # "vm/id" of the catalogs uploaded (new or changed)
    notes: list[str] = field(default_factory=list)       # catalogs left out, and why
    packs: int = 0
    uploaded_bytes: int = 0
    seconds: float = 0.0

    @property
    def mib_per_second(self) -> float:
        return self.uploaded_bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def push(store: Store, vault: Vault, points: list[RecoveryPoint], progress: ProgressFn | None = None,
         bytes_per_second: float = 0, pack_bytes: int = PACK_BYTES, named: bool = False) -> PushSummary:
    """Upload the given recovery points the vault lacks, oldest first: those newer than the VM's newest in
    the vault (older ones were pruned there, or skipped: the vault keeps its own retention), or, named, each
    one it lacks. bytes_per_second limits the upload (0: no limit)."""
    if vault.store_id != store.store_id:
        raise RpfsError(f"{vault.config.label} belongs to another store (id {vault.store_id.hex()}, this one"
                        f" {store.store_id.hex()}); a vault takes the points of the store it was made from")
    changed = [name for name in ("encryption", "block_id", "block_size", "key_check")
               if str(store.meta.get(name, "")) != str(vault.settings.get(name, ""))]
    if changed or (vault.config.key_check and vault.config.key_check != store.meta.get("key_check")):
        raise RpfsError(f"store {store.path} differs from what {vault.config.label} recorded of it when it was added"
                        f" ({', '.join(changed or ['key_check'])}): its settings were changed; nothing was pushed")
    reuse_freed_memory()   # a blob copied out of the store and a part joined at a time: buffers reused
    started, summary = time.monotonic(), PushSummary()
    with VaultLock(vault.bucket, "push") as lock:   # before any index is read (gc.py)
        send_current_slots(store, vault.config, vault.bucket)   # the slots as they are now (keys.py)
        vault.raise_version_for(store)   # before any blob with a key of its own goes up
        vault.index(fresh=True)
        _push(store, vault, points, lock, summary, progress, bytes_per_second, pack_bytes, named)
        send_current_slots(store, vault.config, vault.bucket)   # a key changed during the push
    summary.seconds = time.monotonic() - started
    return summary


def _push(store: Store, vault: Vault, points: list[RecoveryPoint], lock: VaultLock, summary: PushSummary,
          progress: ProgressFn | None, bytes_per_second: float, pack_bytes: int, named: bool) -> None:
    held = vault.point_names(fresh=True)
    newest = {vm: point_id for vm, point_id in held}   # sorted: each VM's newest comes last
    todo = []
    for point in sorted(points, key=lambda p: (p.id, p.vm)):
        there = (point.vm, point.id) in held or (not named and point.id < newest.get(point.vm, ""))
        (summary.already if there else todo).append(point)
    summary.already = [f"{p.vm}/{p.id}" for p in summary.already]
    lease = Lease(store.path)   # prune must not delete a point while it goes up
    try:
        plans, planned = [], _Planned()
        for point in todo:
            lease.take(store, point.vm, point.id)
            plans.append(_plan(store, vault, point, planned))
            plans[-1].catalog = _plan_catalog(store, vault, store.catalog(point.vm, point.id), planned, summary)
        there = set(held)
        catalogs_only = _catalogs_to_send(store, vault, [p for p in points if (p.vm, p.id) in there], planned, summary)
        if any(plan.catalog for plan in plans) or catalogs_only:
            vault.raise_version(CATALOGS_VERSION)   # before any listing goes up (vault.py)
        total = sum(store.blob_lengths(plan.blobs) for plan in plans)
        done, since = 0, time.monotonic()

        def sent(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress:
                progress(done, total)
            if bytes_per_second:
                time.sleep(max(0.0, done / bytes_per_second - (time.monotonic() - since)))
        for plan in plans:
            _upload(store, vault, plan, summary, sent, pack_bytes, lock)
            summary.pushed.append(f"{plan.point.vm}/{plan.point.id}")
        new_listings = ((LISTING, listing_id, sealed) for plan in catalogs_only for listing_id, sealed in plan.new)
        for pack in upload_packs(vault, new_listings, pack_bytes, lock):
            _add_pack(summary, pack)
        for plan in catalogs_only:
            _put_catalog(vault, plan, lock, summary)
    finally:
        lease.close()


@dataclass
class _Planned:
    """What the plans of one push upload already: a blob or piece named by several points goes up once,
    with the first (oldest) of them, whose packs are indexed before its manifest and so before the later
    points' manifests."""
    blobs: set[bytes] = field(default_factory=set)
    pieces: set[bytes] = field(default_factory=set)
    listings: set[bytes] = field(default_factory=set)
    subfolders: dict[bytes, list[bytes]] = field(default_factory=dict)   # listing id -> the listings it names:
                                                                         # unchanged folders are shared by points


@dataclass
class _CatalogPlan:
    catalog: Catalog
    listings: list[bytes]                # every listing the catalog reaches
    new: list[tuple[bytes, bytes]]       # (id, sealed) of those the vault lacks and no earlier plan sends


@dataclass
class _Plan:
    point: RecoveryPoint
    maps: dict[str, tuple[int, list[bytes]]]
    blobs: list[bytes]       # blobs the vault lacks (every blob the point names is checked, not only new pieces')
    pieces: list[bytes]      # pieces the vault lacks
    catalog: _CatalogPlan | None = None


def _plan(store: Store, vault: Vault, point: RecoveryPoint, planned: _Planned) -> _Plan:
    """What one point needs that neither the vault nor an earlier plan of this push has. Every piece's blobs
    are looked up, also for pieces the vault has: a piece uploaded by a push killed before its blobs' packs
    were indexed names blobs the vault may lack."""
    maps = {disk.name: store.map_index(store.map_key(point.vm, point.id, disk.name)) for disk in point.disks}
    blobs: dict[bytes, None] = {}
    pieces: dict[bytes, None] = {}
    for _block_count, ids in maps.values():
        for piece_id in dict.fromkeys(ids):
            sealed_piece, entries = store.stored_piece(piece_id)
            if not entries and not sealed_piece:
                raise RpfsError(f"a piece of the block map of {point.vm}/{point.id} is missing from the local store"
                                " (rpfs check)")
            if piece_id not in planned.pieces and not vault.has(PIECE, piece_id):
                pieces[piece_id] = None
            for digest in digests_in_order(entries):   # disk order: a restore reads them in runs (runs.py)
                if digest not in blobs and digest not in planned.blobs and not vault.has(BLOB, digest):
                    blobs[digest] = None
    planned.blobs.update(blobs)
    planned.pieces.update(pieces)
    return _Plan(point, maps, list(blobs), list(pieces))


def _plan_catalog(store: Store, vault: Vault, catalog: Catalog | None, planned: _Planned,
                  summary: PushSummary) -> _CatalogPlan | None:
    """The listings a catalog reaches, walked in the store from its roots (each read once per push), and those
    of them to send, read, checked against their ids and sealed now: a point cataloged again while it goes
    up loses its old listings in the store. None without a catalog, or with a listing that cannot be read
    (noted: the point goes up without its catalog, and a later push sends it once rpfs check repaired it).
    What it walks joins `planned` only if the whole plan holds: a listing walked by a plan that failed is
    not sent, so a later plan sharing it must read and send it itself."""
    if catalog is None:
        return None
    where = f"{catalog.vm}/{catalog.point_id}"
    reached: dict[bytes, None] = {}
    walked: dict[bytes, list[bytes]] = {}
    new: list[tuple[bytes, bytes]] = []
    pending = catalog.roots()
    try:
        while pending:
            listing_id = pending.pop()
            if listing_id in reached:
                continue
            reached[listing_id] = None
            children = planned.subfolders.get(listing_id)
            if children is None:
                raw = store.listing_bytes(listing_id, where)   # checked against its id
                children = walked[listing_id] = subfolders(raw, f"a listing of {where}")
                if listing_id not in planned.listings and not vault.has(LISTING, listing_id):
                    new.append((listing_id, vault.seal_listing(listing_id, raw)))
            pending.extend(children)
    except (CorruptBlockError, RpfsError) as e:
        summary.notes.append(f"the catalog of {where} was not pushed: {e.message} (rpfs check)")
        return None
    planned.subfolders.update(walked)
    planned.listings.update(listing_id for listing_id, _sealed in new)
    return _CatalogPlan(catalog, list(reached), new)


def _catalogs_to_send(store: Store, vault: Vault, held: list[RecoveryPoint], planned: _Planned,
                      summary: PushSummary) -> list[_CatalogPlan]:
    """Plans for the catalogs of points the vault has already whose catalog object is missing, does not
    open, differs from the store's (the point was cataloged again), or names a listing the vault's index
    lacks and no plan of this push sends (an older rpfs could write one): the plan sends the listings the
    vault lacks from the store, then the object again."""
    cataloged = [(point, found) for point in held if (found := store.catalog(point.vm, point.id)) is not None]
    present = set(vault.objects.catalog_names()) if cataloged else set()   # one LIST: no GET for those missing

    def stale(pair: tuple[RecoveryPoint, Catalog]) -> bool:
        point, catalog = pair
        if (point.vm, point.id) not in present:
            return True
        try:
            there = vault.catalog_object(point.vm, point.id)
        except (CorruptBlockError, RpfsError):
            return True   # replaced whole by a sealed one
        return there is None or there.catalog.to_json() != catalog.to_json() or \
            any(not vault.has(LISTING, i) and i not in planned.listings for i in there.listings)
    with ThreadPoolExecutor(INDEX_READERS) as pool:
        to_send = [catalog for (_point, catalog), changed in zip(cataloged, pool.map(stale, cataloged)) if changed]
    plans = [_plan_catalog(store, vault, catalog, planned, summary) for catalog in to_send]
    return [plan for plan in plans if plan is not None]


def _put_catalog(vault: Vault, plan: _CatalogPlan, lock: VaultLock, summary: PushSummary) -> None:
    """The catalog object, once every listing it names is indexed (this push's packs, or the vault's)."""
    catalog = plan.catalog
    sealed = CatalogObject(catalog, plan.listings).encode(vault.keyring)
    lock.refresh()   # raises if a gc took this push for dead: listings it relies on may be condemned
    vault.objects.put_catalog(catalog.vm, catalog.point_id, sealed)
    summary.catalogs.append(f"{catalog.vm}/{catalog.point_id}")


def _upload(store: Store, vault: Vault, plan: _Plan, summary: PushSummary, sent: Callable[[int], None],
            pack_bytes: int, lock: VaultLock) -> None:
    """The plan's blobs, pieces and listings in packs (each indexed once whole), then the manifest, then
    the catalog object (a kill between the two: the next push sends the catalog)."""
    for pack in upload_packs(vault, _entries(store, plan, sent), pack_bytes, lock):
        _add_pack(summary, pack)
    point = plan.point
    sealed = Manifest(point, plan.maps).encode(vault.keyring)
    lock.refresh()   # raises if a gc took this push for dead: what it relies on may be condemned
    vault.objects.put_manifest(point.vm, point.id, sealed)
    if plan.catalog is not None:
        _put_catalog(vault, plan.catalog, lock, summary)


def _add_pack(summary: PushSummary, stream: PackStream) -> None:
    """Count an uploaded pack and what it holds in the summary."""
    summary.packs += 1
    summary.uploaded_bytes += stream.size
    summary.blobs += sum(1 for kind, *_ in stream.index if kind == BLOB)
    summary.pieces += sum(1 for kind, *_ in stream.index if kind == PIECE)
    summary.listings += sum(1 for kind, *_ in stream.index if kind == LISTING)


def _decoded_copy(store: Store, digest: bytes, stored) -> bytes:
    """A copy of a stored blob, checked by decoding the copy: LMDB's page is read once, so the bytes checked
    are the bytes uploaded."""
    blob = bytes(stored)
    store.codec.decode(digest, blob)
    return blob


def _entries(store: Store, plan: _Plan, sent: Callable[[int], None]) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(kind, id, bytes as stored) of what the plan uploads; every blob decoded whole and checked against its
    id first, the copy that goes up (a damaged local blob is refused, never copied to the vault). Checking
    the frames' tags alone costs a fifth of the CPU but lets through a frame that was wrong before it was
    sealed (docs/dev/benchmarks.md)."""
    where = f"{plan.point.vm}/{plan.point.id}"

    def checked(digest: bytes) -> bytes | None:   # raises CorruptBlockError for a damaged blob
        return store.get_blob(digest, lambda stored: _decoded_copy(store, digest, stored))
    for digest, blob in in_order(checked, plan.blobs, CHECKERS, ahead=4 * CHECKERS):
        if blob is None:
            raise RpfsError(f"block {digest.hex()} of {where} is missing from the local store (rpfs check)")
        yield BLOB, digest, blob
        sent(len(blob))
    for piece_id in plan.pieces:
        stored, _digests = store.stored_piece(piece_id)
        yield PIECE, piece_id, stored
    for listing_id, sealed in plan.catalog.new if plan.catalog else []:
        yield LISTING, listing_id, sealed
