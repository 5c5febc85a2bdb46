"""How block maps are kept (format 3): in content-addressed pieces, shared between recovery points.

A block map (32 bytes per block: its id, or zeros for a hole) is cut into pieces of MAP_PIECE entries.
Each piece is stored once, under its id (the store's block id function of its bytes), in `pieces`; a
recovery point's disk keeps only its index in `maps`: the entry count and the ids of its pieces. A
backup of an unchanged 2 TiB disk therefore adds a 64 KiB index, not a 64 MiB map, and counts:
  piece_refs  piece id -> how many indexes name the piece (once per index)
  refs        block id -> how many stored pieces name the block (once per piece)
so a new index bumps the counts of its pieces, and only a piece new to the store bumps its blocks'.
Deleting an index releases its pieces; a piece no index names goes, and releases its blocks.
In an encrypted store indexes and pieces are sealed (AES-256-GCM, with their database and key as
associated data), and every piece read is checked against its id: a changed, moved or swapped map
reads as an error. Formats 1 and 2 kept whole maps in `maps`; they are read as they are
(flat_map_piece) and turned into pieces by the upgrade (formats.upgrade).
"""
from __future__ import annotations

import struct
import threading
from typing import Callable

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.store.crypto import Keyring, seal_in, unseal_in
from rpfs.store.recovery_point import DIGEST_SIZE, HOLE

MAP_PIECE = 1024                      # block map entries per piece (32 KiB)
PIECE_BYTES = MAP_PIECE * DIGEST_SIZE
COUNT = struct.Struct("<Q")           # an index: the entry count, then the piece ids
INDEXES_KEPT = 64                     # opened indexes kept per store handle
REF = struct.Struct("<I")


def where(map_key: bytes) -> str:
    return map_key.decode(errors="replace").replace("\0", "/")


class BlockMaps:
    """The pieces layout, on the databases of an open store; every call runs in the caller's transaction."""

    def __init__(self, dbs: dict, block_id: Callable[[bytes], bytes], keyring: Keyring | None):
        self._maps, self._pieces = dbs["maps"], dbs["pieces"]
        self._piece_refs, self._refs = dbs["piece_refs"], dbs["refs"]
        self._block_id, self._keyring = block_id, keyring
        self._indexes: dict[bytes, tuple[int, list[bytes]]] = {}   # opened indexes (a map never changes)
        self._indexes_lock = threading.Lock()

    # -- writing -------------------------------------------------------------------------------------
    def put(self, txn, map_key: bytes, block_map: bytes | memoryview) -> None:
        """Store a block map: its new pieces, its index, and the counts."""
        view = memoryview(block_map)
        pieces = [bytes(view[start:start + PIECE_BYTES]) for start in range(0, len(view), PIECE_BYTES)]
        ids = [self._block_id(piece) for piece in pieces]
        for piece_id, piece in dict(zip(ids, pieces)).items():
            count = txn.get(piece_id, db=self._piece_refs)
            if count is None:
                txn.put(piece_id, self._seal(b"pieces", piece_id, piece), db=self._pieces)
                for digest in sorted(distinct_digests(piece)):   # in key order: LMDB pages in turn
                    _bump(txn, self._refs, digest, +1)
            elif txn.get(piece_id, db=self._pieces) is None:   # counted but lost (damage): stored again
                txn.put(piece_id, self._seal(b"pieces", piece_id, piece), db=self._pieces)
            txn.put(piece_id, REF.pack((REF.unpack(count)[0] if count is not None else 0) + 1), db=self._piece_refs)
        index = COUNT.pack(len(view) // DIGEST_SIZE) + b"".join(ids)
        txn.put(map_key, self._seal(b"maps", map_key, index), db=self._maps)

    def delete(self, txn, map_key: bytes) -> int:
        """Remove a block map and release what it named; returns how many blocks no piece names any more.
        A piece that cannot be read keeps its blocks counted (rpfs check recounts): no block is ever freed
        on a guess."""
        released = 0
        stored = txn.get(map_key, db=self._maps)
        try:
            ids = set(self._index(map_key, stored)[1]) if stored is not None else set()
        except CorruptBlockError:   # a damaged index names nothing we can trust: it goes, counts stay
            ids = set()
        for piece_id in ids:
            if _bump(txn, self._piece_refs, piece_id, -1) > 0:
                continue
            try:
                piece = self._piece(txn, piece_id, map_key)
            except CorruptBlockError:
                piece = b""
            txn.delete(piece_id, db=self._pieces)
            for digest in sorted(distinct_digests(piece)):
                released += _bump(txn, self._refs, digest, -1) == 0
        txn.delete(map_key, db=self._maps)
        return released

    # -- reading -------------------------------------------------------------------------------------
    def whole(self, txn, map_key: bytes) -> bytes:
        """A whole block map, every piece checked (b"" when there is none)."""
        stored = txn.get(map_key, db=self._maps)
        if stored is None:
            return b""
        count, ids = self._index(map_key, stored)
        block_map = b"".join(self._piece(txn, piece_id, map_key) for piece_id in ids)
        if len(block_map) != count * DIGEST_SIZE:
            raise CorruptBlockError(f"the block map of {where(map_key)} has {len(block_map) // DIGEST_SIZE} entries,"
                                    f" its index says {count}")
        return block_map

    def piece(self, txn, map_key: bytes, number: int) -> bytes:
        """Entries number*MAP_PIECE... of a block map (fewer at its end), checked."""
        stored = txn.get(map_key, db=self._maps)
        if stored is None:
            raise RpfsError(f"block map missing for {where(map_key)}")
        _count, ids = self._index(map_key, stored)
        if number >= len(ids):
            raise RpfsError(f"block {number * MAP_PIECE} is beyond the block map of {where(map_key)}")
        return self._piece(txn, ids[number], map_key)

    def index(self, txn, map_key: bytes) -> tuple[int, list[bytes]]:
        """The entry count and piece ids of a block map, checked."""
        stored = txn.get(map_key, db=self._maps)
        if stored is None:
            raise RpfsError(f"block map missing for {where(map_key)}")
        return self._index(map_key, stored)

    def piece_ids(self, txn, map_key: bytes) -> list[bytes]:
        stored = txn.get(map_key, db=self._maps)
        return [] if stored is None else self._index(map_key, stored)[1]

    def stored_piece(self, txn, piece_id: bytes, map_key: bytes) -> bytes:
        """A piece by id, checked (for check's recount; errors name map_key, a map that names it)."""
        return self._piece(txn, piece_id, map_key)

    def _index(self, map_key: bytes, stored) -> tuple[int, list[bytes]]:
        """The entry count and piece ids of an index, opened once per map (a reader asks once per piece)."""
        with self._indexes_lock:
            found = self._indexes.get(map_key)
        if found is not None:
            return found
        index = self._unseal(b"maps", map_key, stored, f"the block map index of {where(map_key)}")
        if len(index) < COUNT.size or (len(index) - COUNT.size) % DIGEST_SIZE:
            raise CorruptBlockError(f"the block map index of {where(map_key)} is damaged")
        ids = [bytes(index[at:at + DIGEST_SIZE]) for at in range(COUNT.size, len(index), DIGEST_SIZE)]
        found = COUNT.unpack_from(index)[0], ids
        with self._indexes_lock:
            if len(self._indexes) >= INDEXES_KEPT:
                self._indexes.clear()
            self._indexes[map_key] = found
        return found

    def _piece(self, txn, piece_id: bytes, map_key: bytes | None) -> bytes:
        of = f" of the block map of {where(map_key)}" if map_key else ""
        stored = txn.get(piece_id, db=self._pieces)
        if stored is None:
            raise CorruptBlockError(f"a piece{of} is missing ({piece_id.hex()[:16]})")
        piece = bytes(self._unseal(b"pieces", piece_id, stored, f"a piece{of}"))
        if self._block_id(piece) != piece_id:
            raise CorruptBlockError(f"a piece{of} does not match its id ({piece_id.hex()[:16]})")
        return piece

    def _seal(self, db: bytes, key: bytes, value: bytes) -> bytes:
        return seal_in(self._keyring, db, key, value)

    def _unseal(self, db: bytes, key: bytes, value, what: str):
        return unseal_in(self._keyring, db, key, value, what)


def flat_map_piece(block_map, map_key: bytes, number: int) -> bytes:
    """Entries number*MAP_PIECE... of a whole map as formats 1 and 2 keep it."""
    start = number * PIECE_BYTES
    if start >= max(len(block_map), 1):
        raise RpfsError(f"block {number * MAP_PIECE} is beyond the block map of {where(map_key)}")
    return bytes(block_map[start:start + PIECE_BYTES])


def _bump(txn, db, key: bytes, by: int) -> int:
    """Add `by` to a count (a count at zero is deleted); returns the new count."""
    stored = txn.get(key, db=db)
    count = (REF.unpack(stored)[0] if stored is not None else 0) + by
    if count > 0:
        txn.put(key, REF.pack(count), db=db)
    else:
        txn.delete(key, db=db)
    return max(count, 0)


def distinct_digests(block_map) -> set[bytes]:
    """The distinct stored blocks a block map (or a piece of one) references (holes are not blocks)."""
    view = memoryview(block_map)
    found = {bytes(view[i:i + DIGEST_SIZE]) for i in range(0, len(view), DIGEST_SIZE)}
    found.discard(HOLE)
    return found


def digests_in_order(block_map) -> list[bytes]:
    """The distinct stored blocks a block map (or a piece of one) references, in the order of the disk."""
    view = memoryview(block_map)
    found = dict.fromkeys(bytes(view[i:i + DIGEST_SIZE]) for i in range(0, len(view), DIGEST_SIZE))
    found.pop(HOLE, None)
    return list(found)


def count_references(block_maps) -> dict[bytes, int]:
    """block id -> how many of the given maps (or pieces) reference it."""
    counts: dict[bytes, int] = {}
    for block_map in block_maps:
        for digest in distinct_digests(block_map):
            counts[digest] = counts.get(digest, 0) + 1
    return counts
