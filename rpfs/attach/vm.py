"""Whole-VM attach: every filesystem of every disk of a recovery point, under DEST/<disk>/<partition>.

The disks are read through a private mount of the store (run_dir.attach_files), kept for as long as
the filesystems stay attached; a registry file beside it tells `detach` to unmount it afterwards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rpfs.attach.filesystems import AttachedFilesystem, attach_disks, detach, has_attached
from rpfs.errors import RpfsError
from rpfs.host.mountinfo import fstype_at
from rpfs.serve import daemon, run_dir
from rpfs.serve.store_mount import start_store_daemon
from rpfs.store.recovery_point import RecoveryPoint


def attach_point(store_path: Path, point: RecoveryPoint, dest: Path) -> dict[str, list[AttachedFilesystem]]:
    dest = Path(os.path.abspath(dest))
    registry, store_mount = run_dir.attach_files(dest)
    if registry.exists():
        if has_attached(dest):
            raise RpfsError(f"{dest} already has a VM attached; rpfs detach {dest} first")
        release_attach(registry, store_mount)   # left by an attach that was killed half-way
    # The registry first: whatever a kill leaves from here on, detach (or this again) finds and undoes.
    run_dir.write_file(registry, json.dumps({"dest": str(dest), "store_mount": str(store_mount)}))
    try:
        run_dir.make_folder(store_mount)
        start_store_daemon(store_path, store_mount, 64 << 20)
        images = {d.name: store_mount / point.vm / point.id / f"{d.name}.img" for d in point.disks}
        return attach_disks(images, dest)
    except BaseException:
        release_attach(registry, store_mount)
        raise


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
    """Unmount a whole-VM attach's private store mount and forget it (also check --repair's)."""
    if fstype_at(str(store_mount)) is not None:
        daemon.unmount(store_mount)
    registry.unlink(missing_ok=True)
    try:
        store_mount.rmdir()
    except OSError:
        pass
