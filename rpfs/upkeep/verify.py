"""verify: read every block the recovery points reference (or a sample) and check it against its digest."""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.block_maps import distinct_digests
from rpfs.store.recovery_point import DIGEST_SIZE
from rpfs.store.source import PointKeeper, RecoverySource


@dataclass
class VerifyResult:
    checked_blocks: int = 0
    checked_bytes: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)   # "vm/id" -> ["disk: digest: reason"]


def verify(store: RecoverySource, vm: str | None = None, point_id: str | None = None,
           sample_percent: float = 100.0, progress=None) -> VerifyResult:
    """Read every referenced block (or a random sample) and check it against its digest.

    The points checked are kept first (a lease in a store), so a prune and gc running meanwhile cannot
    delete their blocks and make them look damaged; a point pruned before that is simply not checked."""
    if not 0 < sample_percent <= 100:
        raise RpfsError("--sample must be a percentage above 0 and at most 100")
    points = [store.point(vm, point_id)] if point_id else store.points(vm)
    if vm and not points:
        store.point(vm)   # raises: unknown VM
    with store.keeper() as keeper:
        points, unreachable = _kept(keeper, store, points)
        # read in reader processes: a page that crashes its reader is a damaged point, not a dead verify
        with store.isolated() as reader:
            result = _verify(reader, points, sample_percent, progress)
        result.damaged.update(unreachable)
        return result


def _kept(keeper: PointKeeper, store: RecoverySource, points: list[RecoveryPoint]
          ) -> tuple[list[RecoveryPoint], dict[str, list[str]]]:
    """The points kept, and those listed but not found by their key: a damaged page of the points table
    (bit rot in a branch page) hides a point from a restore's lookup while a listing still shows it."""
    kept, unreachable = [], {}
    for p in points:
        try:
            keeper.take(p.vm, p.id)
        except RpfsError as e:
            if any(q.id == p.id for q in store.points(p.vm)):   # still listed: not pruned, unreachable
                unreachable[f"{p.vm}/{p.id}"] = [f"its record is listed but cannot be looked up: {e.message}"]
            continue   # else pruned since it was listed
        kept.append(p)
    return kept, unreachable


def _verify(store: RecoverySource, points: list[RecoveryPoint], sample_percent: float, progress) -> VerifyResult:
    users: dict[bytes, list[tuple[str, str]]] = {}
    damaged_maps: dict[str, list[str]] = {}
    for p in points:
        for d in p.disks:
            try:
                block_map = store.block_map(store.map_key(p.vm, p.id, d.name))
            except CorruptBlockError as e:
                damaged_maps.setdefault(f"{p.vm}/{p.id}", []).append(f"{d.name}: block map: {e.message}")
                continue
            if len(block_map) != d.blocks * DIGEST_SIZE:   # none at all (b""), as a restore finds it, or short
                damaged_maps.setdefault(f"{p.vm}/{p.id}", []).append(
                    f"{d.name}: block map: {len(block_map) // DIGEST_SIZE} entries for {d.blocks} blocks"
                    + (" (missing)" if not block_map else ""))
                continue
            for digest in distinct_digests(block_map):
                users.setdefault(digest, []).append((f"{p.vm}/{p.id}", d.name))
    digests = list(users)
    if sample_percent < 100:
        digests = random.sample(digests, max(1, round(len(digests) * sample_percent / 100))) if digests else []
    result = VerifyResult(damaged=damaged_maps)

    def check(digest: bytes) -> tuple[bytes, int, str | None]:
        try:
            size = store.get_blob(digest, lambda stored: len(store.codec.decode(digest, stored)))
            return (digest, 0, "missing") if size is None else (digest, size, None)
        except CorruptBlockError as e:
            return digest, 0, e.message
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for digest, size, problem in pool.map(check, digests):
            result.checked_blocks += 1
            result.checked_bytes += size
            if problem:
                for point, disk in users[digest]:
                    result.damaged.setdefault(point, []).append(f"{disk}: block {digest.hex()[:16]}: {problem}")
            if progress:
                progress(result.checked_blocks, len(digests))
    return result
