"""Usage, following Azure Backup's billing model.

Per VM:
  protected instance size  the data really on its disks at the latest recovery point: stored
                           (non-zero) blocks only; holes, zeros and temporary disks (never backed up)
                           are not counted
  backup storage           the compressed bytes the store holds for the VM's recovery points; a block
                           shared by several VMs is split evenly between them, so the VMs add up to
                           the store's total
  snapshot bytes           space allocated to its kept reflink snapshots (shared with the live image
                           until it changes, so at most this much)
Store totals: stored bytes, the bytes of the catalogs of files (shared by the points), deduplication ratio (bytes the recovery points reference / distinct bytes
stored) and compression ratio (distinct bytes / bytes after compression).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rpfs.store.recovery_point import DIGEST_SIZE, HOLE
from rpfs.store.block_maps import distinct_digests
from rpfs.store.store import Store


@dataclass
class VmUsage:
    vm: str
    recovery_points: int
    protected_instance_bytes: int
    backup_storage_bytes: float
    snapshot_bytes: int = 0


@dataclass
class StoreUsage:
    vms: list[VmUsage] = field(default_factory=list)
    stored_bytes: int = 0             # compressed, framed bytes of every block
    distinct_bytes: int = 0           # raw bytes of every distinct block
    referenced_bytes: int = 0         # raw non-zero bytes all recovery points reference
    unreferenced_blocks: int = 0      # what rpfs gc would remove
    catalog_bytes: int = 0            # catalogs of the files inside the disks, as stored (catalogs.py)
    file_bytes: int = 0               # the LMDB file on disk
    attribution: str = "a block shared by several VMs is split evenly between them"

    @property
    def deduplication_ratio(self) -> float:
        return self.referenced_bytes / self.distinct_bytes if self.distinct_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.distinct_bytes / self.stored_bytes if self.stored_bytes else 1.0


def _data_bytes(block_map: bytes, size: int, block_size: int) -> int:
    """Bytes of a disk in stored (non-zero) blocks, the last block counted at its real length."""
    total = 0
    for i in range(0, len(block_map), DIGEST_SIZE):
        if block_map[i:i + DIGEST_SIZE] != HOLE:
            start = (i // DIGEST_SIZE) * block_size
            total += min(block_size, size - start)
    return total


def usage(store: Store) -> StoreUsage:
    result = StoreUsage(file_bytes=(store.path / "data.mdb").stat().st_size)
    owners: dict[bytes, set[str]] = {}
    latest: dict[str, int] = {}
    counts: dict[str, int] = {}
    for point in store.points():      # oldest first: the last one seen per VM is its latest
        counts[point.vm] = counts.get(point.vm, 0) + 1
        protected = 0
        for disk in point.disks:
            block_map = store.block_map(store.map_key(point.vm, point.id, disk.name))
            data = _data_bytes(block_map, disk.size, disk.block_size)
            protected += data
            result.referenced_bytes += data
            for digest in distinct_digests(block_map):
                owners.setdefault(digest, set()).add(point.vm)
        latest[point.vm] = protected
    storage = {vm: 0.0 for vm in counts}   # a VM backed up since the first scan gets counted there
    for digest, stored, raw in store.stored_blob_sizes():
        result.stored_bytes += stored
        result.distinct_bytes += raw
        vms = owners.get(digest)
        if not vms:
            result.unreferenced_blocks += 1
            continue
        for vm in vms:
            storage[vm] = storage.get(vm, 0.0) + stored / len(vms)
    snapshots = {vm: 0 for vm in counts}
    for point in store.points():
        for path in point.snapshot.paths.values() if point.snapshot else ():
            if Path(path).exists():
                snapshots[point.vm] += Path(path).stat().st_blocks * 512
    result.catalog_bytes = store.catalog_stored_bytes()
    result.vms = [VmUsage(vm, counts[vm], latest[vm], round(storage[vm]), snapshots[vm]) for vm in sorted(counts)]
    return result
