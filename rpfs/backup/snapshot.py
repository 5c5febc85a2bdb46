"""Reflink snapshots of a VM's disks, taken in the freeze window and read instead of the live disks.

An image file on a filesystem with reflinks (XFS reflink=1, btrfs) is snapshotted by FICLONE into
`<image folder>/.rpfs-snapshots/<vm>/<id>/<disk>.img`: a clone shares the image's extents, so it
takes well under a second whatever the size, and stays as it was while the VM keeps writing.
.rpfs-snapshots must be root's and writable by nobody else (it is made 0700): root creates and deletes
in it, so nobody else may plant a link there. Clones are 0600 from their creation, 0400 once whole. A disk
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
from rpfs.host.access import owner_name

FICLONE = 0x40049409
SNAPSHOT_DIR = ".rpfs-snapshots"


class CannotSnapshot(Exception):
    """This disk cannot be cloned here; the reason says why, for the user."""


def snapshot_path(image: Path, vm: str, snapshot_id: str, disk: str) -> Path:
    return image.parent / SNAPSHOT_DIR / vm / snapshot_id / f"{disk}.img"


def _open_snapshot_folder(top: Path, create: bool) -> int | None:
    """The .rpfs-snapshots folder, opened without following a link (None when missing and not create):
    refused unless it is root's and nobody else can write it, since root writes and deletes in it."""
    if create:
        try:
            os.mkdir(top, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise RpfsError(f"cannot create {top}: {e.strerror}") from None
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise RpfsError(f"{top} vanished while a snapshot was taken; try again") from None
        return None
    except OSError as e:   # ELOOP or ENOTDIR: a link or a file someone put there
        raise RpfsError(f"{top} is not a folder ({e.strerror}); rpfs keeps snapshots only in a folder of"
                        " root's that nobody else can write: remove it") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise RpfsError(f"{top} is {owner_name(st.st_uid)}'s, mode {stat.S_IMODE(st.st_mode):04o}; rpfs keeps"
                        " snapshots only in a folder of root's that nobody else can write: remove it (or"
                        " chown root and chmod 700 it)")
    return fd


def _split(path: Path) -> tuple[Path, list[str]] | None:
    """(the .rpfs-snapshots folder, the names below it) of a snapshot path; None for any other path."""
    parts = path.parts
    if SNAPSHOT_DIR not in parts[:-1]:
        return None
    at = len(parts) - 1 - parts[::-1].index(SNAPSHOT_DIR)
    return Path(*parts[:at + 1]), list(parts[at + 1:])


def _open_below(fd: int, name: str, create: bool) -> int:
    """A folder below the snapshot folder, made 0700 if create, never through a link."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            pass
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)


def clone(source: Path, target: Path) -> None:
    """A reflink copy of source at a new file target, 0600 from its creation and 0400 once whole (raises
    CannotSnapshot where the filesystem has none). Made through checked folders, never through a link."""
    if not stat.S_ISREG(os.stat(source).st_mode):
        raise CannotSnapshot(f"{source} is a block device")
    top, names = _split(target)
    folders = [_open_snapshot_folder(top, create=True)]
    try:
        try:
            for name in names[:-1]:
                folders.append(_open_below(folders[-1], name, create=True))
            fd = os.open(names[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=folders[-1])
        except OSError as e:
            raise RpfsError(f"cannot create the snapshot {target}: {e.strerror}") from None
        try:
            clone_into(source, fd)
            os.fchmod(fd, 0o400)   # a kept snapshot stands for a recovery point: nobody writes it
        except BaseException:
            os.close(fd)
            delete([target])   # and the folders made for it
            raise
        os.close(fd)
    finally:
        for folder in folders:
            os.close(folder)


def clone_into(source: Path, fd: int, follow: bool = True) -> None:
    """Make the file open at fd a reflink copy of source (CannotSnapshot where the filesystem has none).
    follow=False for a kept snapshot: it is opened without following a link."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(e.errno, e.strerror, str(source)) from None
        raise RpfsError(f"cannot open {source}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise CannotSnapshot(f"{source} is a block device")
        try:
            fcntl.ioctl(fd, FICLONE, src)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                raise CannotSnapshot(f"the filesystem holding {source} has no reflinks") from None
            raise RpfsError(f"cannot snapshot {source}: {e.strerror}") from None
    finally:
        os.close(src)


def clone_kept(kept: Path, fd: int) -> None:
    """Clone a kept snapshot into fd (a restore): only out of a snapshot folder root alone can write."""
    split = _split(kept)
    if split is None:
        raise FileNotFoundError(errno.ENOENT, "not a snapshot", str(kept))
    folder = _open_snapshot_folder(split[0], create=False)
    if folder is None:
        raise FileNotFoundError(errno.ENOENT, "no snapshot folder", str(split[0]))
    os.close(folder)
    clone_into(kept, fd, follow=False)


def take(images: dict[str, Path], vm: str, snapshot_id: str) -> dict[str, Path]:
    """Clone every image, one right after the other (call it inside the freeze window).

    All or nothing: if one disk cannot be cloned, the clones made so far are removed."""
    made: dict[str, Path] = {}
    try:
        for disk, image in images.items():
            target = snapshot_path(image, vm, snapshot_id, disk)
            clone(image, target)
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
        top = Path(image).parent / SNAPSHOT_DIR
        folder = _open_snapshot_folder(top, create=False)   # refused if someone else could have planted them
        if folder is None:
            continue
        os.close(folder)
        for path in (top / vm).glob("*/*.img"):
            if path not in recorded and not path.is_symlink():
                found.append(path)
    return found


def delete(paths) -> None:
    """Remove snapshot files, and their folders once empty; through the checked snapshot folder, never
    through a link (a path that is not a snapshot's is left alone)."""
    for path in paths:
        split = _split(Path(path))
        if split is None:
            continue
        top, names = split
        folder = _open_snapshot_folder(top, create=False)
        if folder is None:
            continue
        folders = [folder]
        try:
            try:
                for name in names[:-1]:
                    folders.append(_open_below(folders[-1], name, create=False))
                os.unlink(names[-1], dir_fd=folders[-1])
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                continue   # a link where a folder should be: not a snapshot of ours
            for depth in range(len(folders) - 1, 0, -1):   # the emptied folders, deepest first
                try:
                    os.rmdir(names[depth - 1], dir_fd=folders[depth - 1])
                except OSError:
                    break
        finally:
            for fd in folders:
                os.close(fd)
        try:
            top.rmdir()   # a link there is not removed: rmdir never follows the last name
        except OSError:
            pass
