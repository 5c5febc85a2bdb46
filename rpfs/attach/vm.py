"""Whole-VM attach: every filesystem of every disk of a recovery point, under DEST/<disk>/<partition>.

The disks are read through a private mount of the store (run_dir.attach_files), kept for as long as
the filesystems stay attached; a registry file beside it tells `detach` to unmount it afterwards.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rpfs.attach.filesystems import AttachedFilesystem, attach_disks, detach, has_attached
from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place
from rpfs.host.mountinfo import fstype_at
from rpfs.host import run_dir
from rpfs.serve import daemon
from rpfs.serve.store_mount import start_store_daemon
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.source import RecoverySource


def attach_point(store: RecoverySource, point: RecoveryPoint, dest: Path, require_mountable: bool = True) \
        -> dict[str, list[AttachedFilesystem]]:
    """Run again (after a kill, or not), it completes what the earlier run attached, through its store mount."""
    dest = Path(os.path.abspath(dest))
    check_trusted_place(dest, "attach destination", private=True)   # before a store mount is started for it
    registry, store_mount = run_dir.attach_files(dest)
    if registry.exists() and not _serving(store_mount):
        if has_attached(dest):
            raise RpfsError(f"{dest} has a VM attached whose store mount is gone; rpfs detach {dest} first")
        release_attach(registry, store_mount)   # left by an attach that was killed half-way
    fresh = not registry.exists()
    if fresh:   # the registry first: whatever a kill leaves from here on, detach (or this again) finds and undoes
        run_dir.write_file(registry, json.dumps({"dest": str(dest), "store_mount": str(store_mount)}))
    try:
        if fresh:
            run_dir.make_folder(store_mount)
            start_store_daemon(store, store_mount, 64 << 20)
        images = {d.name: store_mount / point.vm / point.id / f"{d.name}.img" for d in point.disks}
        return attach_disks(images, dest, require_mountable)   # refused if another recovery point is attached there
    except BaseException:
        if fresh or not has_attached(dest):
            release_attach(registry, store_mount)
        raise


def _serving(store_mount: Path, starting_seconds: float = 10.0) -> bool:
    """The private store mount of an earlier attach serves, or its daemon (whose attach was killed while it
    started) is about to: it is used rather than another started beside it."""
    deadline, unseen = time.monotonic() + starting_seconds, 0
    while True:
        running = bool(_daemons_for(store_mount))
        if running and fstype_at(os.path.realpath(store_mount)) == daemon.FSTYPE:
            return True
        # Gone only when not seen three times in a row: a process in the middle of its exec shows no
        # command line for a moment (the daemon's starter execs it).
        unseen = 0 if running else unseen + 1
        if unseen == 3 or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _daemons_for(store_mount: Path) -> list[int]:
    """rpfs processes whose command line names the store mount: its daemon, from the moment it is started
    (before it has written its pid file or mounted anything)."""
    wanted = os.fsencode(os.path.realpath(store_mount))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rpfs" in argv and wanted in argv:
            found.append(int(entry.name))
    return found


def detach_point_or_image(dest: Path) -> list[str]:
    """Undo an attach at dest; for a whole-VM attach also unmount its private store mount."""
    dest = Path(os.path.abspath(dest))
    registry, store_mount = run_dir.attach_files(dest)
    if not registry.exists():
        return detach(dest)
    undone = detach(dest, missing_ok=True)   # a killed attach may have mounted nothing yet
    release_attach(registry, store_mount)
    return undone


def release_attach(registry: Path, store_mount: Path) -> None:
    """Unmount a whole-VM attach's private store mount and forget it (also check --repair's); the record
    goes last, so a kill on the way leaves it for detach (or this again) to finish."""
    if fstype_at(str(store_mount)) is not None:
        daemon.unmount(store_mount)
    try:
        store_mount.rmdir()
    except OSError:
        pass
    registry.unlink(missing_ok=True)
