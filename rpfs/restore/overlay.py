"""A qcow2 overlay over a recovery point's image in the store mount: the VM way to use a point at once.

The overlay records its backing file by path, so the path must name the recovery point itself:
`MOUNT/<vm>/latest/<disk>.img` would become another point after the next backup, under a running VM.
The point is pinned, so prune keeps it for as long as the overlay needs it.
"""
from __future__ import annotations

import os
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place
from rpfs.host.mountinfo import fstype_at
from rpfs.host.tools import run_tool
from rpfs.serve.daemon import FSTYPE
from rpfs.store.leases import set_pinned
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import Store


def create_overlay(store: Store, point: RecoveryPoint, disk_name: str, mount: Path, target: Path) -> Path:
    """Create target (qcow2) backed by the point's own image under mount; returns the backing path."""
    check_trusted_place(target, "overlay")   # made, then chmodded, by name
    disk = point.disk(disk_name)
    mount = Path(os.path.realpath(mount))
    if fstype_at(str(mount)) != FSTYPE:
        raise RpfsError(f"{mount} is not an rpfs mount (mount the store first: rpfs mount {mount})")
    backing = mount / point.vm / point.id / f"{disk.name}.img"
    if not backing.exists():
        raise RpfsError(f"{backing} is not there: is {mount} a mount of store {store.path}?")
    if target.exists() or target.is_symlink():
        raise RpfsError(f"{target} already exists; choose a new path")
    set_pinned(store, point.vm, point.id, True)
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(target)])
    os.chmod(target, 0o600)   # the guest's writes land here
    return backing
