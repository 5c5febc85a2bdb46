"""The read side, named: what a recovery point is read from (a store, its reader processes, or a vault).

The image read path (serve/image.py), the mount, the full and instant restores and verify read through
this one interface; `Store` (store.py), `IsolatedStore` (isolated.py) and `Vault` (rpfs/vault/vault.py)
each satisfy it, so no caller asks which one it was given (tests/test_recovery_source.py runs the same
checks over all three). The vault is above the store: it implements the protocol, the store never imports it.

How a point is kept while it is read differs by source, and is said here once:
  keeper()          while this process reads: a lease in a store (leases.py; prune skips a leased point),
                    nothing in a vault (nothing local prunes it: NoKeeper);
  hold()            across processes, for an unfinished instant restore: a hold file in the store's leases,
                    a hold object in the vault (which gc honours too); release_hold() ends it, adopt_hold()
                    makes a daemon read the point as held (a vault's manifest may be pruned meanwhile).
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from rpfs.store.blob import BlockCodec, Cut
from rpfs.store.recovery_point import RecoveryPoint

T = TypeVar("T")


@dataclass(frozen=True)
class SourceName:
    """How another process of rpfs's own (a daemon) opens the same source again: a store by its folder (as
    it was opened), a vault by the name this machine's vault list gives it."""
    store: Path | None = None
    vault: str = ""

    def options(self) -> list[str]:
        """The global options of the rpfs command line that name it."""
        return ["--vault", self.vault] if self.vault else ["--store", os.path.abspath(self.store or "")]


class PointKeeper(Protocol):
    """Keeps recovery points from prune while this process reads them; a context manager that closes."""

    def take(self, vm: str, point_id: str) -> None:
        """Keep a point. A keeper that keeps anything (a lease) then checks the point is still there:
        RpfsError if it was pruned just before."""

    def remove(self, vm: str, point_id: str) -> None:
        """Stop keeping a point (another take of it may follow)."""

    def close(self) -> None: ...

    def __enter__(self) -> "PointKeeper": ...

    def __exit__(self, *exc) -> None: ...


class NoKeeper:
    """The keeper of a source that nothing on this host prunes under a reader (a vault)."""

    def take(self, vm: str, point_id: str) -> None:
        pass

    def remove(self, vm: str, point_id: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoKeeper":
        return self

    def __exit__(self, *exc) -> None:
        pass


class RecoverySource(Protocol):
    """What recovery points are read from: their records, block maps and blocks, and how one is kept.
    Reads are thread-safe. Blocks come back as stored: decode (serve/image.py: codec) checks them."""

    path: Path                     # what messages call it (a vault: its label)
    block_size: int
    codec: BlockCodec
    parallel_reads: int | None     # blocks a restore reads at once: None, the reader's own default; a vault more
    kept_snapshots: bool           # a restore may clone a point's kept reflink snapshot on this host (a store's)

    @property
    def master_key(self) -> bytes | None:
        """The unlocked master key (None: not encrypted), to hand to a daemon of rpfs's own."""

    def source_name(self) -> SourceName: ...

    # -- recovery points
    def vms(self) -> list[str]: ...

    def point_ids(self, vm: str) -> list[str]:
        """Oldest first."""

    def latest_point_id(self, vm: str) -> str | None: ...

    def has_point(self, vm: str, point_id: str) -> bool: ...

    def point(self, vm: str, point_id: str | None = None) -> RecoveryPoint:
        """By id, or the VM's latest (None or 'latest'); RpfsError for an unknown VM or point."""

    def points(self, vm: str | None = None) -> list[RecoveryPoint]: ...

    def stored_bytes(self) -> int: ...

    # -- block maps and blocks
    @staticmethod
    def map_key(vm: str, point_id: str, disk: str) -> bytes: ...

    def block_map(self, map_key: bytes) -> bytes:
        """A whole block map, 32 bytes per block (b"" if there is none), for scans of every block."""

    def block_digest(self, map_key: bytes, index: int) -> bytes: ...

    def get_blob(self, digest: bytes, decode: Callable[[memoryview | Cut], T] = bytes,
                 part: tuple[int, int] | None = None) -> T | None:
        """A stored blob passed through decode, None if absent; part (start, stop of the block): only
        what that range needs (a blob.Cut for a store's readers and a vault)."""

    # -- keeping a point while it is read
    def keeper(self) -> PointKeeper: ...

    def hold(self, name: str, vm: str, point_id: str, target: Path) -> bool:
        """Keep a point for an unfinished instant restore into target, across processes; True if new.
        Raises RpfsError if the point no longer exists."""

    def release_hold(self, name: str) -> None: ...

    def adopt_hold(self, name: str) -> None:
        """Read the held point as it was held from now on (a daemon of the instant restore)."""

    def isolated(self) -> AbstractContextManager["RecoverySource"]:
        """This source read so that a damaged page costs a read an error, not this process (a store: through
        reader processes, isolated.py; the others are so already)."""

    def close(self) -> None: ...

    def __enter__(self) -> "RecoverySource": ...

    def __exit__(self, *exc) -> None: ...
