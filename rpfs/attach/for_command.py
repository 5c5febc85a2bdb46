"""A recovery point's filesystems attached read-only for one command (catalog, restore-files), undone after.

Each attach lives in the run dir's `files/` folder as `<name>/` (the whole-VM attach's destination, with
its private store mount: attach/vm.py) beside `<name>.lock`, which the command holds flocked for as long
as it runs. The lock file is locked before it has a name (O_TMPFILE, then linked in), so no other command
ever sees it unlocked while it is in use. A command killed half-way leaves both; the next one that
attaches (or rpfs check --repair) finds the lock free and undoes what it left: detach, unmount the
store mount, remove both.
"""
from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rpfs.attach.filesystems import AttachedFilesystem
from rpfs.attach.vm import attach_point, detach_point_or_image
from rpfs.host import run_dir
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.source import RecoverySource


def folder() -> Path:
    return run_dir.root() / "files"


@contextmanager
def point_attached(source: RecoverySource, point: RecoveryPoint) -> Iterator[dict[str, list[AttachedFilesystem]]]:
    """Every filesystem of every disk of the point, read-only; a disk with none mountable is listed with
    why. Undone on the way out, whatever happens (a kill: by the next command)."""
    clean_leftovers()
    place = run_dir.make_folder(folder())
    name = uuid.uuid4().hex
    lock = _locked_file(place, f"{name}.lock")
    dest = place / name
    try:
        yield attach_point(source, point, dest, require_mountable=False)
    finally:
        try:
            _undo(dest)
        finally:
            (place / f"{name}.lock").unlink(missing_ok=True)
            os.close(lock)


def clean_leftovers() -> list[str]:
    """Undo the attaches of commands that were killed (their lock files free); returns what was undone."""
    return _leftovers(undo=True)


def leftovers() -> list[Path]:
    """The attaches of commands that were killed (their lock files free), left as they are (rpfs check)."""
    return [folder() / name for name in _leftovers(undo=False)]


def _leftovers(undo: bool) -> list[str]:
    place = folder()
    if not place.is_dir():
        return []
    found = []
    for lock_path in sorted(place.glob("*.lock")):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue   # its command runs
            if undo:
                _undo(place / lock_path.stem)
                lock_path.unlink(missing_ok=True)
            found.append(lock_path.stem)
        finally:
            os.close(fd)
    return found


def _undo(dest: Path) -> None:
    if run_dir.attach_files(dest)[0].exists():   # written before anything is mounted (attach/vm.py)
        detach_point_or_image(dest)
    _remove_folders(dest)


def _remove_folders(dest: Path) -> None:
    """Remove dest and the empty folders the attach made in it (dest/<disk>/<p1|disk>), which a kill in the
    middle of a detach can leave; never a file, a link or a mount (rmdir refuses: an error, nothing lost)."""
    try:
        disks = [p for p in dest.iterdir() if not p.is_symlink() and p.is_dir() and not os.path.ismount(p)]
    except FileNotFoundError:
        return
    for disk in disks:
        for inner in disk.iterdir():
            if not inner.is_symlink() and inner.is_dir() and not os.path.ismount(inner):
                inner.rmdir()
        disk.rmdir()
    dest.rmdir()


def _locked_file(place: Path, name: str) -> int:
    """A new 0600 file, flocked before it is linked into place."""
    fd = os.open(place, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        folder_fd = os.open(place, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:   # linkat(AT_SYMLINK_FOLLOW) names the unnamed file; Python uses it only given a dir fd
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd
