"""Reflink snapshots of a VM's disks, taken in the freeze window and read instead of the live disks.

An image file on a filesystem with reflinks (XFS reflink=1, btrfs) is snapshotted by FICLONE into
`<image folder>/.rpfs-snapshots/<vm>/<id>/<disk>.img`: a clone shares the image's extents, so it
takes well under a second whatever the size, and stays as it was while the VM keeps writing. A disk
that cannot be cloned (a block device, or a filesystem without reflinks) is read live, which is only
safe when nothing uses it (host/disk_use.py).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from rpfs.errors import RpfsError

FICLONE = 0x40049409
SNAPSHOT_DIR = ".rpfs-snapshots"


class CannotSnapshot(Exception):
    """This disk cannot be cloned here; the reason says why, for the user."""


def snapshot_path(image: Path, vm: str, snapshot_id: str, disk: str) -> Path:
    return image.parent / SNAPSHOT_DIR / vm / snapshot_id / f"{disk}.img"


def clone(source: Path, target: Path) -> None:
    """A reflink copy of source at a new file target (raises CannotSnapshot where the filesystem has none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        clone_into(source, fd)
    except BaseException:
        os.close(fd)
        delete([target])   # and the folders made for it
        raise
    os.close(fd)


def clone_into(source: Path, fd: int) -> None:
    """Make the file open at fd a reflink copy of source (CannotSnapshot where the filesystem has none)."""
    if not stat.S_ISREG(os.stat(source).st_mode):
        raise CannotSnapshot(f"{source} is a block device")
    with open(source, "rb") as src:
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                raise CannotSnapshot(f"the filesystem holding {source} has no reflinks") from None
            raise RpfsError(f"cannot snapshot {source}: {e.strerror}") from None


def take(images: dict[str, Path], vm: str, snapshot_id: str) -> dict[str, Path]:
    """Clone every image, one right after the other (call it inside the freeze window).

    All or nothing: if one disk cannot be cloned, the clones made so far are removed."""
    made: dict[str, Path] = {}
    try:
        for disk, image in images.items():
            target = snapshot_path(image, vm, snapshot_id, disk)
            clone(image, target)
            os.chmod(target, 0o400)   # a kept snapshot stands for a recovery point: nobody writes it
            made[disk] = target
    except BaseException:
        delete(made.values())
        raise
    return made


def orphans(images, vm: str, recorded: set[Path]) -> list[Path]:
    """Snapshot files of the VM beside its images that no recovery point records: left by a backup that
    was killed (kill -9, a power cut) before it could delete them. Each pins the image's old extents."""
    found = []
    for image in images:
        for path in (Path(image).parent / SNAPSHOT_DIR / vm).glob("*/*.img"):
            if path not in recorded and not path.is_symlink():
                found.append(path)
    return found


def delete(paths) -> None:
    """Remove snapshot files, and their folders once empty."""
    for path in paths:
        path = Path(path)
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder.name != SNAPSHOT_DIR and folder != folder.parent:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
        if folder.name == SNAPSHOT_DIR:
            try:
                folder.rmdir()
            except OSError:
                pass
