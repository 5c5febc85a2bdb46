"""Leases: which recovery points a reader has open, so prune never deletes one under it.

Readers are mount daemons (the recovery points with an image open right now; a loop device keeps it
open), full restores and instant-restore daemons (the recovery point they copy). A reader holds a
shared flock on its lease file (STORE/leases/lease-<pid>-<n>) for as long as it lives and lists the
recovery points there; prune skips them. A lease file whose flock is free belongs to a reader that
died and is removed. The list is rewritten in place, padded rather than truncated, so a reader of the
file never sees it shorter; prune re-reads a file caught mid-rewrite.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rpfs.errors import RpfsError
from rpfs.host.files import write_whole
from rpfs.host.untrusted import parse_json
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.source import SourceName

if TYPE_CHECKING:   # store.py makes its keeper here: only the types are needed
    from rpfs.store.source import RecoverySource
    from rpfs.store.store import Store

LEASE_DIR = "leases"
_numbers = itertools.count()


class Lease:
    def __init__(self, store_path: Path):
        folder = store_path / LEASE_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        for dead in stale_leases(store_path):   # readers that died before they could remove theirs
            dead.unlink(missing_ok=True)
        self.path = folder / f"lease-{os.getpid()}-{next(_numbers)}"
        # Locked before it has its name: prune takes an unlocked lease file for a dead reader's.
        unfinished = folder / f".{self.path.name}"
        unfinished.unlink(missing_ok=True)   # left by a killed process that had this pid
        self._fd = os.open(unfinished, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        os.replace(unfinished, self.path)
        self._points: set[tuple[str, str]] = set()
        self._lock = threading.Lock()   # the mount takes leases on worker threads, releases on its own

    def add(self, vm: str, point_id: str) -> bool:
        """List a recovery point; False if it was listed already."""
        with self._lock:
            if (vm, point_id) in self._points:
                return False
            self._points.add((vm, point_id))
            self._write()
            return True

    def take(self, store: RecoverySource, vm: str, point_id: str) -> None:
        """Lease a recovery point, then check it still exists, both under the shared gate: prune checks
        the leases and deletes under the exclusive gate, so either it deleted the point before (this
        raises) or it leaves the point alone for as long as it is leased."""
        with gate(store.path, exclusive=False):
            added = self.add(vm, point_id)
            _still_there(store, vm, point_id, undo=lambda: self.remove(vm, point_id) if added else None)

    def remove(self, vm: str, point_id: str) -> None:
        with self._lock:
            if (vm, point_id) in self._points:
                self._points.discard((vm, point_id))
                self._write()

    def _write(self) -> None:
        data = json.dumps(sorted(self._points)).encode()
        self._length = max(len(data), getattr(self, "_length", 0))
        os.pwrite(self._fd, data.ljust(self._length), 0)   # trailing spaces are valid JSON

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


class LeaseKeeper:
    """A store's keeper (store/source.py, RecoverySource.keeper): one lease for the points it takes."""

    def __init__(self, store: RecoverySource):
        self._store, self._lease = store, Lease(store.path)

    def take(self, vm: str, point_id: str) -> None:
        self._lease.take(self._store, vm, point_id)

    def remove(self, vm: str, point_id: str) -> None:
        self._lease.remove(vm, point_id)

    def close(self) -> None:
        self._lease.close()

    def __enter__(self) -> "LeaseKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def gate(store_path: Path, exclusive: bool) -> Iterator[None]:
    """Makes "take a lease, then check the point still exists" (readers, shared) and "check the leases,
    then delete the point" (prune, exclusive) happen one before the other, never interleaved."""
    folder = store_path / LEASE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    # Shared by every reader and deleter, so not O_EXCL; never through a planted link.
    fd = os.open(folder / "gate", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def set_pinned(store: Store, vm: str, point_id: str, pinned: bool) -> RecoveryPoint:
    """Pin (or unpin) a recovery point under the shared gate: a prune re-reads `pinned` under the
    exclusive gate before it deletes, so it never deletes a point pinned after it decided."""
    with gate(store.path, exclusive=False):
        return store.modify_point(vm, point_id, lambda p: setattr(p, "pinned", pinned))


def hold(store: RecoverySource, name: str, vm: str, point_id: str, target: Path | str) -> bool:
    """A lease that outlives processes: an unfinished instant restore needs its recovery point even while
    no daemon runs. Taken like Lease.take, under the gate; released by release_hold once the copy is done.
    True when the hold is new (not one an earlier run took)."""
    path = store.path / LEASE_DIR / f"hold-{name}"
    with gate(store.path, exclusive=False):
        existed = path.exists()
        write_whole(path, json.dumps([[vm, point_id, str(target)]]).encode())   # never seen half-written
        _still_there(store, vm, point_id, undo=lambda: None if existed else path.unlink(missing_ok=True))
    return not existed


def _still_there(store: RecoverySource, vm: str, point_id: str, undo: Callable[[], None]) -> None:
    """The second half of taking a lease, under the gate: the point exists, or the lease just taken is undone."""
    if not store.has_point(vm, point_id):
        undo()
        raise RpfsError(f"recovery point {vm}/{point_id} no longer exists (it was just pruned)")


def holds(store_path: Path) -> dict[str, tuple[str, str, str | None]]:
    """name -> (vm, recovery point, target or None) of every hold (older ones do not name their target)."""
    found = {}
    for path in sorted((store_path / LEASE_DIR).glob("hold-*")):
        try:
            [entry] = parse_json(path.read_text())
            found[path.name.removeprefix("hold-")] = (str(entry[0]), str(entry[1]), entry[2] if len(entry) > 2 else None)
        except (OSError, ValueError, TypeError, IndexError):
            raise RpfsError(f"cannot read the lease {path}; nothing was pruned (rpfs check --repair)") from None
    return found


def release_hold(store_path: Path, name: str) -> None:
    (store_path / LEASE_DIR / f"hold-{name}").unlink(missing_ok=True)


class KeptByLeases:
    """How a store's points are kept while read (the read side, source.py), for Store and IsolatedStore
    alike: a lease for this process's reads, a hold file for an unfinished instant restore."""
    path: Path

    def source_name(self) -> SourceName:
        return SourceName(store=self.path)

    def keeper(self) -> LeaseKeeper:
        return LeaseKeeper(self)

    def hold(self, name: str, vm: str, point_id: str, target: Path) -> bool:
        return hold(self, name, vm, point_id, target)

    def release_hold(self, name: str) -> None:
        release_hold(self.path, name)

    def adopt_hold(self, name: str) -> None:
        pass   # a held point stays in the store: it is read as it is


def leased_points(store_path: Path) -> dict[tuple[str, str], str]:
    """(vm, recovery point) -> holder, for every live lease; stale lease files are removed."""
    found: dict[tuple[str, str], str] = {}
    for name, (vm, point_id, _) in holds(store_path).items():
        found[(vm, point_id)] = "an unfinished instant restore"
    for path, fd, held in _lease_files(store_path):
        if not held:
            path.unlink(missing_ok=True)      # its reader is gone
            continue
        for vm, point_id in _read_points(fd, path):
            found[(vm, point_id)] = f"a reader (pid {path.name.split('-')[1]})"
    return found


def stale_leases(store_path: Path) -> list[Path]:
    """Lease files whose reader died (nobody holds their flock); prune removes them as it goes."""
    return [path for path, _, held in _lease_files(store_path) if not held]


def _lease_files(store_path: Path) -> Iterator[tuple[Path, int, bool]]:
    """(path, an fd open on it while the caller looks, whether a living reader holds it) per lease file."""
    for path in sorted((store_path / LEASE_DIR).glob("lease-*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
            yield path, fd, held
        finally:
            os.close(fd)


def _read_points(fd: int, path: Path) -> list:
    for _ in range(20):
        try:
            return parse_json(os.pread(fd, 1 << 20, 0) or b"[]")
        except ValueError:   # caught in the middle of a rewrite
            time.sleep(0.01)
    raise RpfsError(f"cannot read the lease {path}; nothing was pruned")
