"""Removing what no manifest needs from a vault, exactly, while pushes may run (S3 has no locks).

A gc run does two things, in this order:
1. It finishes the condemnation the previous run recorded in gc/condemned, if every push whose lock
   was there when that run hid the packs has ended: it lists the manifests now, and deletes each
   condemned pack whose needed entries are all in a pack that has an index; one holding a needed entry
   no indexed pack holds gets its index back ("rescued").
2. It condemns: from the manifests listed now, the packs that hold no needed entry (each entry counts
   in one pack only, the one the index names, even if a crash left it in two), and packs without an
   index (interrupted uploads, or uploads in progress); and it repacks: a pack whose needed entries take
   less than REPACK_BELOW of it has them copied (checked) into new packs, indexed, and is condemned too.
   It records them (with their sealed indexes) in gc/condemned, deletes their indexes (so no push that
   starts from now on sees their blobs), then lists the locks and records them too. The packs are
   deleted by the next run (1); a pack condemned for having no index is spared if it has one by then.

Why nothing a manifest needs is ever deleted: a push takes its lock before it reads any index, and
writes a manifest only while its lock is there. Take a push that relies on a condemned pack: it read
that pack's index before run (2) deleted it, so its lock was written before run (2) listed the locks.
Either its lock was listed, and step (1) waits until it is gone, by which time its manifest, if it
wrote one, is listed by step (1); or it had ended before the listing, manifest and all, and step (1)
lists that manifest too. Either way step (1) sees every manifest that can name a condemned pack. A
push that starts after the indexes were deleted never sees the condemned blobs and uploads its own.
Manifests name entries, not packs: an entry is needed from a condemned pack only if no indexed pack
holds it, and a repack indexes its new packs before it condemns the old ones.

Catalog objects (catalogs/<vm>/<id>) are read as manifests are: a push writes one only while its lock is
there, after every listing it names is indexed, so the same argument keeps every listing a catalog object
names. They are listed before the manifests: a push writes a point's catalog object after its manifest, so
a catalog object listed then whose manifest is not listed now belongs to a pruned point (a prune killed
between deleting the two) and is removed, its listings needed no more.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.threads import in_order
from rpfs.store.block_maps import distinct_digests
from rpfs.vault.locks import VaultLock, bury, locks, remove_old_tombstones
from rpfs.vault.packs import PACK_BYTES, upload_packs
from rpfs.vault.layout import CONDEMNED, Condemned
from rpfs.vault.vault import BLOB, LISTING, PIECE, Location, Vault

REPACK_BELOW = 0.5     # a pack whose needed entries take less than this share of it is repacked
REPACK_READERS = 16    # entries of half-empty packs fetched at once


@dataclass
class GcSummary:
    deleted_packs: int = 0
    deleted_bytes: int = 0
    condemned_packs: int = 0
    rescued_packs: int = 0
    repacked_packs: int = 0      # half-empty packs whose needed entries were copied into new packs
    repacked_bytes: int = 0      # bytes copied
    waiting_for: list[str] = field(default_factory=list)   # live locks that keep the condemned packs
    removed_locks: list[str] = field(default_factory=list)
    removed_catalogs: int = 0    # catalog objects of points pruned from the vault (a prune killed midway)


def gc(vault: Vault, pack_bytes: int = PACK_BYTES) -> GcSummary:
    summary = GcSummary()
    for lock in locks(vault.bucket):
        if lock.kind == "gc" and not lock.dead():
            raise RpfsError(f"{vault.config.label}: another gc is running ({lock.describe()}); try again later")
        if lock.dead():
            bury(vault.bucket, lock)
            summary.removed_locks.append(lock.describe())
    remove_old_tombstones(vault.bucket)
    with VaultLock(vault.bucket, "gc") as lock:
        record = _record(vault)
        if record is not None and record.locks is None:   # the run before died while condemning
            _hide(vault, record)
        if record is not None:
            _finish(vault, record, summary)
        if not summary.waiting_for:
            _condemn(vault, summary, lock, pack_bytes)
    return summary


def pending(vault: Vault) -> bool:
    """True while packs condemned by a run wait for the next one."""
    return vault.objects.condemned() is not None


def _needed(vault: Vault, summary: GcSummary) -> set[tuple[bytes, bytes]]:
    """Every (kind, id) a manifest listed now needs, or a hold's copy of one (an instant restore copying a
    point prune may have deleted): their pieces and the blobs they name; and the listings the catalog objects
    name. Manifests are listed before holds: a hold is written, then its manifest checked to be there
    (Vault.hold), so a point whose manifest this listing missed (deleted before it) had its hold written
    before the holds are listed. Catalog objects are listed before the manifests (_catalog_listings)."""
    needed: set[tuple[bytes, bytes]] = set()
    catalogs = vault.objects.catalog_names()
    points = vault.point_names(fresh=True)
    maps = [(vm, point_id, vault.manifest_maps(vm, point_id)) for vm, point_id in points]
    maps += [(hold.vm, hold.point_id, vault.held_maps(hold)) for hold in vault.holds()]
    for vm, point_id, disks in maps:
        for _block_count, piece_ids in disks.values():
            for piece_id in piece_ids:
                if (PIECE, piece_id) in needed:
                    continue
                needed.add((PIECE, piece_id))
                try:
                    piece = vault.piece(piece_id)   # also from a condemned pack (Vault._fetch)
                except CorruptBlockError as e:
                    raise RpfsError(f"{vault.config.label}: {e.message}; gc deleted nothing (what the recovery point"
                                    f" {vm}/{point_id} needs cannot be known: rpfs --vault ... verify)") from None
                needed.update((BLOB, digest) for digest in distinct_digests(piece))
    needed.update(_catalog_listings(vault, catalogs, set(points), summary))
    return needed


def _catalog_listings(vault: Vault, catalogs: list[tuple[str, str]], points: set[tuple[str, str]],
                      summary: GcSummary) -> set[tuple[bytes, bytes]]:
    """The listings the catalog objects name. catalogs was listed before points: a push writes a catalog
    object after its point's manifest, so one whose manifest points lacks belongs to a point pruned since
    (a prune killed between deleting the two) and is removed here. A catalog object that does not open stops
    gc: what it names cannot be known."""
    needed: set[tuple[bytes, bytes]] = set()
    for vm, point_id in catalogs:
        if (vm, point_id) not in points:
            vault.objects.delete_catalog(vm, point_id)
            summary.removed_catalogs += 1
            continue
        try:
            found = vault.catalog_object(vm, point_id)
        except CorruptBlockError as e:
            raise RpfsError(f"{e.message}; gc deleted nothing (what it names cannot be known: rpfs vault push"
                            " sends the store's catalog again)") from None
        if found is not None:   # else pruned meanwhile
            needed.update((LISTING, listing_id) for listing_id in found.listings)
    return needed


def _condemn(vault: Vault, summary: GcSummary, lock: VaultLock, pack_bytes: int) -> None:
    index = vault.index(fresh=True)   # first: what step (1) rescued is in it, and the record is gone
    needed = _needed(vault, summary)
    by_pack: dict[str, list[tuple[tuple[bytes, bytes], Location]]] = {}
    for key, location in index.items():   # each entry in the one pack the index names
        if key in needed:
            by_pack.setdefault(location.pack, []).append((key, location))
    indexed = set(vault.objects.indexed_packs())
    condemned: dict[str, str | None] = {}
    half_empty: list[str] = []
    for pack, size in vault.objects.packs().items():   # listed before any repack: new packs are not in it
        if pack not in indexed:
            condemned[pack] = None   # an interrupted upload, or an index a crashed gc deleted
        elif pack not in by_pack:
            condemned[pack] = ""
        elif sum(location.length for _key, location in by_pack[pack]) < REPACK_BELOW * size:
            half_empty.append(pack)
    if half_empty:   # copied and indexed before the old packs are condemned
        summary.repacked_bytes = _repack(vault, [entry for pack in half_empty for entry in by_pack[pack]],
                                         lock, pack_bytes)
        summary.repacked_packs = len(half_empty)
        condemned.update(dict.fromkeys(half_empty, ""))
    for pack, sealed in condemned.items():
        if sealed == "":
            sealed = vault.objects.index(pack)
            condemned[pack] = base64.b64encode(sealed).decode() if sealed is not None else None
    if not condemned:
        return
    record = Condemned(condemned)
    vault.put_condemned(record)
    _hide(vault, record)
    summary.condemned_packs = len(condemned)


def _repack(vault: Vault, entries: list[tuple[tuple[bytes, bytes], Location]], lock: VaultLock,
            pack_bytes: int) -> int:
    """Copy entries (each checked whole: a damaged one stops gc before anything is condemned) into new
    packs, indexed once whole; returns the bytes copied."""
    def read(entry: tuple[tuple[bytes, bytes], Location]) -> bytes:
        (kind, entry_id), location = entry
        try:
            return vault.read_checked(kind, entry_id, location)
        except CorruptBlockError as e:
            raise RpfsError(f"{vault.config.label}: {e.message}; gc condemned nothing (rpfs --vault ... verify"
                            " names the points that need it)") from None
    ordered = sorted(entries, key=lambda entry: (entry[1].pack, entry[1].offset))   # disk order kept
    copied = ((kind, entry_id, data) for ((kind, entry_id), _where), data
              in in_order(read, ordered, REPACK_READERS, ahead=2 * REPACK_READERS))
    return sum(pack.size for pack in upload_packs(vault, copied, pack_bytes, lock))


def _hide(vault: Vault, record: Condemned) -> None:
    """Delete the condemned packs' indexes, then record the locks there are from then on. A pack condemned
    for having no index keeps it if one appears: a running push may be about to write it."""
    for pack, sealed in record.packs.items():
        if sealed is not None:
            vault.objects.delete_index(pack)
    record.uploads = vault.objects.unfinished_pack_uploads()   # before the locks: their pushes are listed
    record.locks = [lock.name for lock in locks(vault.bucket) if lock.kind != "gc"]
    vault.put_condemned(record)


def _finish(vault: Vault, record: Condemned, summary: GcSummary) -> None:
    live = {lock.name: lock for lock in locks(vault.bucket)}
    waiting = [live[name].describe() for name in record.locks or [] if name in live]
    if waiting:
        summary.waiting_for = waiting
        return
    needed = _needed(vault, summary)
    available = vault.index(fresh=True)   # the indexed packs' entries: condemned packs' are not in it
    sizes = vault.objects.packs()
    indexed = set(vault.objects.indexed_packs())
    for pack, sealed in record.packs.items():
        if pack in indexed:
            continue   # rescued by a run that then stopped, or indexed by its push after all: visible, kept
        entries = vault.index_entries(pack, Condemned.index_of(sealed)) if sealed else []
        if any(key in needed and key not in available for key, _offset, _length in entries):
            vault.objects.put_index(pack, Condemned.index_of(sealed))   # a manifest needs it after all
            summary.rescued_packs += 1
            continue
        if pack in sizes:
            vault.objects.delete_pack(pack)
            summary.deleted_packs += 1
            summary.deleted_bytes += sizes[pack]
    for name, upload_id in record.uploads:   # their pushes have ended: nobody completes them now
        vault.objects.abort_upload(name, upload_id)
    vault.objects.delete_condemned()


def _record(vault: Vault) -> Condemned | None:
    try:
        return vault.condemned()
    except CorruptBlockError:
        if _rescue_unsealed(vault):
            return None
        raise RpfsError(f"{vault.config.label}: {CONDEMNED} is damaged (it does not open with the vault's key);"
                        " nothing was deleted, and gc cannot go on while it is there") from None


def _rescue_unsealed(vault: Vault) -> bool:
    """A record written unsealed (by an rpfs before records were sealed, or planted) is trusted to delete
    nothing, but the indexes it keeps are sealed each: every listed pack that still exists gets its index
    back if that opens, then the record goes. The next runs condemn again what no manifest needs. False if
    it is no such record. Run again after a kill, it does the same."""
    packs = Condemned.legacy_packs(vault.objects.condemned() or b"")
    if packs is None:
        return False
    existing = vault.objects.packs()
    indexed = set(vault.objects.indexed_packs())
    for pack, sealed in packs.items():
        if pack in indexed or pack not in existing:
            continue
        try:
            index = Condemned.index_of(sealed)
            vault.index_entries(pack, index)
        except (ValueError, RpfsError, CorruptBlockError):
            continue
        vault.objects.put_index(pack, index)
    vault.objects.delete_condemned()
    return True
