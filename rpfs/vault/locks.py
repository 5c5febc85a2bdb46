"""Who is writing to a vault: S3 has no locks, so each push and gc leaves an object naming itself.

locks/<kind>-<host>-<pid>-<random> holds the machine (/etc/machine-id and boot id), pid and process
start time; it is written before the writer reads anything and removed when it ends, and a push writes
it again after each pack (its LastModified shows it alive). A lock is dead when its machine is this one
and its process is gone, or when nobody refreshed it for STALE_SECONDS. gc buries a dead lock: it
writes dead/<lock> first, then removes the lock; a writer checks for its tombstone whenever it
refreshes its lock (before each manifest above all), so a writer taken for dead never writes again.
gc.py says why this makes gc exact.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

from rpfs.errors import RpfsError
from rpfs.host.processes import machine_id, start_time
from rpfs.host.untrusted import parse_json
from rpfs.vault.layout import LOCKS, TOMBSTONES, clock_object, lock_object, tombstone
from rpfs.vault.s3 import Bucket

STALE_SECONDS = 3600          # a lock nobody refreshed for this long is taken for a dead writer's
TOMBSTONE_DAYS = 7            # tombstones older than this are removed (a writer stalled that long is gone)


@dataclass
class LockInfo:
    name: str
    kind: str
    host: str
    machine: str
    pid: int
    pid_start: str
    age_seconds: float

    def describe(self) -> str:
        return f"a {self.kind} on {self.host} (pid {self.pid}), last seen {self.age_seconds:.0f} s ago"

    def dead(self) -> bool:
        if self.machine == machine_id():
            return start_time(self.pid) != self.pid_start
        return self.age_seconds > STALE_SECONDS


class VaultLock:
    """This process's lock: taken on entry, refreshed by refresh(), removed on exit."""

    def __init__(self, bucket: Bucket, kind: str):
        self.bucket, self.kind = bucket, kind
        self.name = lock_object(f"{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        self._body = json.dumps({"kind": kind, "host": socket.gethostname(), "machine": machine_id(),
                                 "pid": os.getpid(), "pid_start": start_time(os.getpid())}).encode()

    def refresh(self) -> None:
        """Show this writer alive; raises if a gc took it for dead meanwhile (then nothing it relies on is
        safe: it must stop before writing anything that names what it read)."""
        if self.bucket.get(tombstone(self.name)) is not None:
            raise RpfsError(f"{self.bucket.label}: a vault gc took this {self.kind} for a dead one (it was silent"
                            f" for over {STALE_SECONDS // 60} minutes); nothing half-done is visible: run it again")
        self.bucket.put(self.name, self._body)

    def __enter__(self) -> "VaultLock":
        self.bucket.put(self.name, self._body)
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            self.bucket.delete(self.name)
        except RpfsError:
            if error is None:
                raise   # else the failure that ended the writer is the one to tell


def bury(bucket: Bucket, lock: LockInfo) -> None:
    """Remove a dead lock, its tombstone first (gc)."""
    bucket.put(tombstone(lock.name), b"")
    bucket.delete(lock.name)


def remove_old_tombstones(bucket: Bucket) -> None:
    now = server_now(bucket)
    for name, _size, modified in list(bucket.listing(TOMBSTONES)):
        if (now - modified).total_seconds() > TOMBSTONE_DAYS * 86400:
            bucket.delete(name)


def locks(bucket: Bucket) -> list[LockInfo]:
    """Every lock in the vault, with its age by the gateway's clock (a fresh object's LastModified)."""
    now = server_now(bucket)
    found = []
    for name, _size, modified in list(bucket.listing(LOCKS)):
        raw = bucket.get(name)
        age = (now - modified).total_seconds()
        try:
            record = parse_json(raw or b"{}")
            found.append(LockInfo(name, str(record["kind"]), str(record["host"]), str(record.get("machine", "")),
                                  int(record["pid"]), str(record["pid_start"]), age))
        except (ValueError, KeyError, TypeError):   # damaged or half-gone: alive until stale
            found.append(LockInfo(name, "writer", "unknown", "", 0, "", age))
    return found


def server_now(bucket: Bucket) -> datetime:
    """The gateway's time, so ages never depend on this machine's clock."""
    name = clock_object(secrets.token_hex(8))
    bucket.put(name, b"")
    try:
        for listed, _size, modified in list(bucket.listing(name)):
            if listed == name:
                return modified
    finally:
        bucket.delete(name)
    return datetime.now(timezone.utc)

