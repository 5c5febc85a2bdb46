"""Leases: which recovery points a mount daemon has open, so prune never deletes one under a reader.

A daemon holds a shared flock on its lease file (STORE/leases/mount-<pid>) for as long as it lives,
and lists there every recovery point with an image open right now (a loop device keeps it open). prune skips leased recovery points; a
lease file whose flock is free belongs to a daemon that died and is removed.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

LEASE_DIR = "leases"


class Lease:
    def __init__(self, store_path: Path):
        folder = store_path / LEASE_DIR
        folder.mkdir(exist_ok=True)
        self.path = folder / f"mount-{os.getpid()}"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        self._points: set[tuple[str, str]] = set()

    def add(self, vm: str, point_id: str) -> None:
        if (vm, point_id) not in self._points:
            self._points.add((vm, point_id))
            self._write()

    def remove(self, vm: str, point_id: str) -> None:
        if (vm, point_id) in self._points:
            self._points.discard((vm, point_id))
            self._write()

    def _write(self) -> None:
        data = json.dumps(sorted(self._points)).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


def leased_points(store_path: Path) -> dict[tuple[str, str], str]:
    """(vm, recovery point) -> holder, for every live lease; stale lease files are removed."""
    found: dict[tuple[str, str], str] = {}
    for path in sorted((store_path / LEASE_DIR).glob("mount-*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)      # nobody holds it: its daemon is gone
                continue
            except BlockingIOError:
                pass
            try:
                points = json.loads(os.pread(fd, 1 << 20, 0) or b"[]")
            except ValueError:
                points = []
            for vm, point_id in points:
                found[(vm, point_id)] = f"a mount (pid {path.name.removeprefix('mount-')})"
        finally:
            os.close(fd)
    return found
