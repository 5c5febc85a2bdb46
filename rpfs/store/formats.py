"""Store format versions: which this rpfs reads, the databases each has, the refusal of the others, and the
upgrade of an older store to the current one. The format and why it is so: docs/design/store-format.md.

Version 7 adds catalogs of the files inside the disks (catalogs.py); a version 6 store has none until
`rpfs catalog` makes them, and is marked 7 (its catalog databases added) by the first writing command, so an
older rpfs, which would prune points without releasing their catalogs, refuses it from then on.

Version 1 and 2 stores (whole block maps in `maps`, counted per map; version 1 without refs, policies,
protected, jobs) are read as they are by read-only commands and upgraded in place to version 7 (their maps
cut into pieces, counts recounted; unencrypted, sha256 block ids kept), in one transaction, by the first
writing command. Version 3 differs from 4 only in that its blobs are never in frames, 4 from 5 only in
that it has no `sizes`, and 5 from 6 only in that no sealed blob has a key of its own (flag BLOCK_KEY,
blob.py): all are read as they are and marked version 7 by the first writing command (old blobs stay as
they are: all decode; a blob without a size record is measured from `blocks`, slowly), so an rpfs that
knows no frames, sizes or block keys refuses it from then on (an older one would delete blobs and keep
their sizes, or read new blobs as damaged). A version 3 store of a development build that kept
whole maps (no meta map_layout) is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rpfs.errors import RpfsError
from rpfs.store.blob import BlockCodec
from rpfs.store.block_maps import BlockMaps

if TYPE_CHECKING:
    from rpfs.store.store import Store

FORMAT_VERSION = 7
PIECES_VERSIONS = (3, 4, 5, 6, FORMAT_VERSION)   # block maps in pieces; 3: no blob in frames yet; 3, 4: no sizes;
                                              # 3 to 5: no blob with a key of its own; 3 to 6: no catalogs
SIZES_VERSION = 5                             # the first with `sizes`
CATALOGS_VERSION = 7                          # the first with `catalogs`, `listings`, `listing_refs`
MAP_LAYOUT = "pieces"
V1_DB_NAMES = (b"meta", b"blocks", b"points", b"maps")
V2_DB_NAMES = V1_DB_NAMES + (b"refs", b"policies", b"protected", b"jobs")
V4_DB_NAMES = V2_DB_NAMES + (b"keys", b"pieces", b"piece_refs")
V5_DB_NAMES = V4_DB_NAMES + (b"sizes",)
DB_NAMES = V5_DB_NAMES + (b"catalogs", b"listings", b"listing_refs")


def refuse_unreadable(path: Path, version: int, meta: dict[bytes, bytes]) -> None:
    """Refuse a store of a format version this rpfs does not read, in one line."""
    if version not in (1, 2, *PIECES_VERSIONS):
        raise RpfsError(
            f"store {path} has format version {version}; this rpfs reads versions 1 to {FORMAT_VERSION}"
            " (use a matching rpfs release)")
    if version in PIECES_VERSIONS and meta.get(b"map_layout") != MAP_LAYOUT.encode():
        raise RpfsError(f"store {path} was made by a development build of format 3 that kept whole block maps;"
                        " this rpfs cannot read it: back up into a new store")


def db_names(version: int) -> tuple[bytes, ...]:
    """The named databases a store of this (readable) version has."""
    if version == 1:
        return V1_DB_NAMES
    if version == 2:
        return V2_DB_NAMES
    if version < SIZES_VERSION:
        return V4_DB_NAMES
    return V5_DB_NAMES if version < CATALOGS_VERSION else DB_NAMES


def upgrade(store: "Store", version: int) -> None:
    """Version 1 to 6 -> 7, in one transaction. From 1 and 2: add the new databases, cut every whole
    block map into pieces and count everything anew; blocks keep their sha256 ids, the store stays
    unencrypted. From 3 to 5 the version changes and `sizes` is added if missing: blobs written from now
    on may be in frames, have their sizes recorded and (sealed) keys of their own (those before are
    measured from `blocks` when asked, and open with the store-wide blocks key)."""
    def fill(txn):
        for name in DB_NAMES[len(V1_DB_NAMES):]:
            store._dbs[name.decode()] = store._env.open_db(name, txn=txn, create=True)
        found = int(txn.get(b"format_version", db=store._dbs["meta"]) or b"0")
        if found > FORMAT_VERSION or found < 1:   # a newer rpfs upgraded it since we looked
            raise RpfsError(f"store {store.path} has format version {found} now; this rpfs reads versions 1 to"
                            f" {FORMAT_VERSION} (use a matching rpfs release)")
        if found in PIECES_VERSIONS:   # its maps are indexes already (another command may have upgraded it)
            txn.put(b"format_version", str(FORMAT_VERSION).encode(), db=store._dbs["meta"])
            return
        keys = [bytes(k) for k in txn.cursor(db=store._dbs["maps"]).iternext(values=False)]
        txn.drop(store._dbs["refs"], delete=False)
        layout = BlockMaps(store._dbs, BlockCodec("sha256").block_id, None)
        for key in keys:   # one whole map in memory at a time
            layout.put(txn, key, bytes(txn.get(key, db=store._dbs["maps"])))
        txn.put(b"map_layout", MAP_LAYOUT.encode(), db=store._dbs["meta"])
        txn.put(b"format_version", str(FORMAT_VERSION).encode(), db=store._dbs["meta"])
    store.write(fill)
