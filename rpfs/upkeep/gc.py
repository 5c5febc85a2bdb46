"""gc: remove the stored blocks no recovery point references; LMDB reuses the freed pages.

Safe without time-based grace periods: every block map's blocks are counted in `refs`, in the same
transaction that adds or deletes the recovery point, and gc runs under the store's writer lock, so no
running backup can be relying on a block gc removes. A `refs` table a lookup cannot trust (bit rot in a
branch page hides counts from lookups) would make referenced blocks look unreferenced: gc then removes
nothing and says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from rpfs.errors import RpfsError
from rpfs.store.store import WRITER_WAIT_SECONDS, Store


@dataclass
class GcResult:
    removed_blocks: int = 0
    freed_bytes: int = 0


def gc(store: Store) -> GcResult:
    """Remove every block no recovery point references; LMDB reuses the freed pages."""
    result = GcResult()
    with store.writer_lock("gc", wait_seconds=WRITER_WAIT_SECONDS):
        damage = store.table_damage("refs")
        if damage:
            raise RpfsError(f"gc removed nothing: the refs table is damaged ({damage}); run rpfs check")
        batch: list[bytes] = []

        def commit():
            removed = store.remove_blobs(batch)   # their stored sizes
            result.removed_blocks += len(removed)
            result.freed_bytes += sum(removed)
        for digest in list(store.unreferenced_blocks()):
            batch.append(digest)
            if len(batch) >= 4096:
                commit()
                batch = []
        commit()
    return result
