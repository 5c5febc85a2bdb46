"""Snapshots of a VM's disks before they are read, and the check for disks in use.

An image file on a filesystem with reflinks (XFS reflink=1, btrfs) is snapshotted by FICLONE into
`<image folder>/.rpfs-snapshots/<vm>/<id>/<disk>.img`: a clone shares the image's extents, so it
takes well under a second whatever the size, and stays as it was while the VM keeps writing. A disk
that cannot be cloned (a block device, or a filesystem without reflinks) is read live, which is only
safe when nothing uses it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.host.mountinfo import read_mountinfo

FICLONE = 0x40049409
SNAPSHOT_DIR = ".rpfs-snapshots"


class CannotSnapshot(Exception):
    """This disk cannot be cloned here; the reason says why, for the user."""


def snapshot_path(image: Path, vm: str, snapshot_id: str, disk: str) -> Path:
    return image.parent / SNAPSHOT_DIR / vm / snapshot_id / f"{disk}.img"


def clone(source: Path, target: Path) -> None:
    """A reflink copy of source at target (raises CannotSnapshot where the filesystem has none)."""
    if not stat.S_ISREG(os.stat(source).st_mode):
        raise CannotSnapshot(f"{source} is a block device")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as e:
            dst.close()
            delete([target])   # and the folders made for it
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


def in_use(path: Path) -> str | None:
    """Why reading this disk live would give a torn copy, or None when nothing uses it."""
    real = os.path.realpath(path)
    mode = os.stat(real).st_mode
    if stat.S_ISBLK(mode):
        if any(os.path.realpath(m.source) == real for m in read_mountinfo() if m.source.startswith("/dev/")):
            return f"{path} is mounted"
        holders = Path("/sys/class/block") / os.path.basename(real) / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            return f"{path} is held by another device"
    else:
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if backing.read_text().strip() == real:
                    return f"{path} is attached to /dev/{backing.parent.parent.name}"
            except OSError:
                continue
    writer = _open_for_writing(real)
    if writer:
        return f"{path} is open for writing by {writer}"
    return None


def _open_for_writing(real: str) -> str | None:
    """A process (other than this one) that has the file open for writing, as 'name (pid N)'."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    if os.readlink(fd) != real:
                        continue
                    flags = int((proc / "fdinfo" / fd.name).read_text().split("flags:")[1].split()[0], 8)
                except (OSError, IndexError, ValueError):
                    continue
                if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    return f"{(proc / 'comm').read_text().strip()} (pid {proc.name})"
        except OSError:
            continue
    return None
