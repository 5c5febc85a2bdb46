"""Who is writing to a vault: S3 has no locks, so each push and gc leaves an object naming itself.

locks/<kind>-<host>-<pid>-<random> holds the host, pid and process start time; it is written before the
writer reads anything and removed when it ends, and a push writes it again after each pack (its
LastModified shows it alive). A lock is dead when its host is this one and its process is gone, or when
nobody refreshed it for STALE_SECONDS; gc removes dead locks. gc.py says why this makes gc exact.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from rpfs.host.processes import start_time
from rpfs.vault.s3 import Bucket

STALE_SECONDS = 3600   # a lock nobody refreshed for this long is taken for a dead writer's


@dataclass
class LockInfo:
    name: str
    kind: str
    host: str
    pid: int
    pid_start: str
    age_seconds: float

    def describe(self) -> str:
        return f"a {self.kind} on {self.host} (pid {self.pid}), last seen {self.age_seconds:.0f} s ago"

    def dead(self) -> bool:
        if self.host == socket.gethostname():
            return start_time(self.pid) != self.pid_start
        return self.age_seconds > STALE_SECONDS


class VaultLock:
    """This process's lock: taken on entry, refreshed by refresh(), removed on exit."""

    def __init__(self, bucket: Bucket, kind: str):
        self.bucket, self.kind = bucket, kind
        self.name = f"locks/{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._body = json.dumps({"kind": kind, "host": socket.gethostname(), "pid": os.getpid(),
                                 "pid_start": start_time(os.getpid())}).encode()
        self.refreshed = 0.0   # time.monotonic() of the last write

    def refresh(self) -> None:
        self.bucket.put(self.name, self._body)
        self.refreshed = time.monotonic()

    def __enter__(self) -> "VaultLock":
        self.refresh()
        return self

    def __exit__(self, *exc) -> None:
        self.bucket.delete(self.name)


def locks(bucket: Bucket) -> list[LockInfo]:
    """Every lock in the vault, with its age by the gateway's clock (a fresh object's LastModified)."""
    now = server_now(bucket)
    found = []
    for name, _size, modified in bucket.listing("locks/"):
        raw = bucket.get(name)
        try:
            record = json.loads(raw or b"{}")
            found.append(LockInfo(name, str(record["kind"]), str(record["host"]), int(record["pid"]),
                                  str(record["pid_start"]), (now - modified).total_seconds()))
        except (ValueError, KeyError, TypeError):   # damaged or half-gone: it counts as alive until stale
            found.append(LockInfo(name, "writer", "unknown", 0, "", (now - modified).total_seconds()))
    return found


def server_now(bucket: Bucket) -> datetime:
    """The gateway's time, so ages never depend on this machine's clock."""
    name = f"clock/{secrets.token_hex(8)}"
    bucket.put(name, b"")
    try:
        for listed, _size, modified in bucket.listing(name):
            if listed == name:
                return modified
    finally:
        bucket.delete(name)
    return datetime.now(timezone.utc)
