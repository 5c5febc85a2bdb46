"""What a recovery point is: an immutable record of every disk of a VM at one moment.

A recovery point's disks each have a block map: one 32-byte SHA-256 digest per block, or HOLE for an
all-zero block that was never stored. The record itself is small JSON; block maps are kept apart
(store.py) so that listing recovery points never reads them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.untrusted import parse_json

DIGEST_SIZE = 32
HOLE = bytes(DIGEST_SIZE)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")   # whole names only: fullmatch


def check_name(kind: str, name: str) -> str:
    """VM and disk names become path components of the mount, so keep them to a safe alphabet."""
    if not NAME_RE.fullmatch(name) or name in ("latest",):
        raise RpfsError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_', '+', '-'"
                        " (not starting with a symbol, not 'latest')")
    return name


@dataclass
class DiskRecord:
    name: str
    size: int
    block_size: int
    blocks: int
    zero_blocks: int = 0
    new_blocks: int = 0
    new_stored_bytes: int = 0      # compressed bytes this backup added to the store for this disk
    stored_bytes: int = 0          # compressed bytes of all distinct blocks this disk references
    source: str = ""
    change_tracking: str = ""      # extents: unchanged blocks found by FIEMAP against the previous snapshot,
                                   # not read; dirty-bitmap: only QEMU's dirty extents since the previous
                                   # point's checkpoint read; checksum: every block read and hashed ("" before
                                   # rpfs knew)
    change_tracking_reason: str = ""   # why checksum, when a cheaper way was expected (a chain broken)
    read_bytes: int = 0            # bytes this backup read from the disk (holes and unchanged blocks are not)


@dataclass
class KeptSnapshot:
    """The reflink snapshots a backup kept on the host after reading them (the instant-restore tier)."""
    paths: dict[str, str]                      # disk -> snapshot file
    keep_until: str                            # ISO 8601, UTC: deleted once this has passed
    stamps: dict[str, list[int]] = field(default_factory=dict)   # disk -> [size, mtime_ns] as the backup read it

    def expired(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.keep_until) <= now

    def unchanged(self, disk: str, size: int) -> Path | None:
        """The snapshot of disk if it is still exactly what the backup read (so it equals the recovery
        point's disk), else None."""
        path, stamp = self.paths.get(disk), self.stamps.get(disk)
        if path is None or stamp is None:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return Path(path) if [st.st_size, st.st_mtime_ns] == stamp and stamp[0] == size else None


@dataclass
class RecoveryPoint:
    vm: str
    id: str
    time: str                       # ISO 8601, UTC, when the backup started reading
    consistency: str = "crash"      # application | file-system | crash | inconsistent | shut-off (a libvirt
                                    # domain that was not running: its disks as the guest left them)
    consistency_reason: str = ""    # why not better (no guest agent, a freeze that failed, ...)
    disks: list[DiskRecord] = field(default_factory=list)
    duration_seconds: float = 0.0
    quiesce: dict = field(default_factory=dict)    # script results, freeze window, disks read live
    snapshot: KeptSnapshot | None = None            # kept reflink snapshots, if any
    pinned: bool = False                            # never pruned while pinned
    libvirt: dict = field(default_factory=dict)     # a libvirt domain's point: domain name, uuid, state,
                                                    # its XML, the checkpoint this point ends

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)

    @property
    def stored_bytes(self) -> int:
        return sum(d.stored_bytes for d in self.disks)

    @property
    def new_stored_bytes(self) -> int:
        return sum(d.new_stored_bytes for d in self.disks)

    def disk(self, name: str) -> DiskRecord:
        for d in self.disks:
            if d.name == name:
                return d
        raise RpfsError(f"recovery point {self.vm}/{self.id} has no disk {name!r}"
                        f" (disks: {', '.join(d.name for d in self.disks) or 'none'})")

    def to_dict(self) -> dict:
        """The record as stored and shown (--json, info.json): no kept snapshot is written as {}."""
        record = asdict(self)
        record["snapshot"] = record["snapshot"] or {}
        return record

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "RecoveryPoint":
        """The record as stored; a damaged one (bit rot) is an RpfsError, never a half-read record."""
        try:
            raw = parse_json(bytes(data))
            known = set(DiskRecord.__dataclass_fields__)   # a field a later rpfs added is left out, not fatal
            disks = [DiskRecord(**{k: v for k, v in d.items() if k in known}) for d in raw.pop("disks")]
            snapshot = raw.pop("snapshot", None)
            raw = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}   # as for disks
            return cls(disks=disks, snapshot=KeptSnapshot(**snapshot) if snapshot else None, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptBlockError(f"a recovery point record is damaged ({e}); rpfs check tells more") from None


def new_point_id(when: datetime, used: set[str]) -> str:
    """Ids sort by time: 2026-11-25T170003Z, with a -N suffix if a VM backs up twice in one second.

    A new id comes after every id the VM ever used (pruned ones too): a mount, and the kernel's page
    cache behind it, know a recovery point by its id, so an id given twice would serve the old data."""
    base, n = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ"), 1
    last = max(used, key=_id_order, default=None)
    if last is not None and _id_order(last) >= (base, n):   # same second, or a clock that went back
        base, n = _id_order(last)
        n += 1
    return base if n == 1 else f"{base}-{n}"


def _id_order(point_id: str) -> tuple[str, int]:
    """2026-11-25T170003Z-3 -> ("2026-11-25T170003Z", 3): the order ids were given in."""
    base, sep, n = point_id.partition("Z-")
    return (base + "Z", int(n)) if sep else (point_id, 1)
