"""The partial-file protocol: a restore into PATH writes PATH.rpfs-partial, renamed to PATH only when whole.

Full and instant restores both follow it, so PATH never holds half an image and two restores never
share a partial file:
- the partial file is created with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, and whoever writes it holds an
  exclusive flock on it for as long as it does;
- an instant restore also keeps PATH.rpfs-instant (its state: source and bitmap). While that exists the
  partial file holds the user's writes and belongs to that instant restore: nothing else touches it;
- a partial file with no state file beside it and nobody holding its flock was left by a restore that
  died: the next restore into PATH removes it (under the flock) and starts afresh, so running the same
  command again finishes the job;
- a link at either name, even a dangling one, is refused, never followed nor replaced: in a folder others
  can write, it was planted to make root write somewhere else.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.host.files import fsync_folder

PARTIAL_SUFFIX = ".rpfs-partial"
STATE_SUFFIX = ".rpfs-instant"


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + PARTIAL_SUFFIX)


def state_path(target: Path) -> Path:
    """An instant restore's state file; its existence marks the partial file as that restore's."""
    return target.with_name(target.name + STATE_SUFFIX)


def refuse_link(path: Path) -> None:
    """Refuse a link where rpfs creates or opens a file of its own."""
    if path.is_symlink():
        raise RpfsError(f"{path} is a symbolic link; rpfs never writes or reads through one there (remove it)")


def check_free(target: Path) -> None:
    """Refuse, before anything is written, a target another restore is working on."""
    refuse_link(partial_path(target))
    refuse_link(state_path(target))
    settle(target)
    if state_path(target).exists():
        raise RpfsError(f"{target} has an unfinished instant restore ({state_path(target)}); finish it with"
                        " rpfs instant-restore (same VM, recovery point and disk), or choose another path")
    fd = open_existing(partial_path(target), os.O_RDONLY)
    if fd is not None:
        try:
            _lock(fd, partial_path(target))
        finally:
            os.close(fd)


def settle(target: Path) -> None:
    """Finish an instant restore that was killed between renaming its copy into place and deleting its
    state file: the state file without its partial file, beside a whole PATH nobody serves, is stale."""
    if not state_path(target).exists() or partial_path(target).exists():
        return
    fd = open_existing(target, os.O_RDONLY)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # its daemon holds PATH while it serves the image
    except BlockingIOError:
        return
    finally:
        os.close(fd)
    state_path(target).unlink(missing_ok=True)


def in_use(target: Path) -> bool:
    """Whether a process (a restore, an instant restore's daemon) holds the partial file's flock now."""
    fd = open_existing(partial_path(target), os.O_RDONLY)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class PartialFile:
    """PATH.rpfs-partial, open and flocked by this process."""

    def __init__(self, target: Path, fd: int):
        self.target, self.path, self.fd = target, partial_path(target), fd

    @classmethod
    def create(cls, target: Path) -> "PartialFile":
        """Claim a new, empty partial file for a restore; a dead restore's is removed first."""
        check_free(target)
        path = partial_path(target)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            _remove_dead(target)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise RpfsError(f"another restore is writing {path}; wait for it to finish") from None
        except OSError as e:
            raise RpfsError(f"cannot create {path}: {e.strerror}") from None
        partial = cls._locked(target, fd)
        if state_path(target).exists():   # an instant restore claimed the target meanwhile
            partial.discard()
            raise RpfsError(f"{target} has an unfinished instant restore ({state_path(target)})")
        return partial

    @classmethod
    def resume(cls, target: Path) -> "PartialFile":
        """The partial file of an unfinished instant restore, for the one process that serves it."""
        fd = open_existing(partial_path(target), os.O_RDWR)
        if fd is None:
            raise RpfsError(f"{partial_path(target)} is missing: the unfinished instant restore into {target}"
                            f" cannot be resumed (remove {state_path(target)} to start anew)")
        return cls._locked(target, fd)

    @classmethod
    def _locked(cls, target: Path, fd: int) -> "PartialFile":
        try:
            _lock(fd, partial_path(target))
            _check_same(fd, partial_path(target))
        except BaseException:
            os.close(fd)
            raise
        return cls(target, fd)

    def finish(self) -> None:
        """Sync, rename over PATH, sync the folder: from here on PATH is the whole image."""
        os.fsync(self.fd)
        _check_same(self.fd, self.path)
        os.replace(self.path, self.target)   # the open fd follows the file, and so does its flock
        fsync_folder(self.target.parent)

    def discard(self) -> None:
        """Remove the partial file of a restore that failed (one that holds no user writes)."""
        try:
            _check_same(self.fd, self.path)
            self.path.unlink()
        except RpfsError:
            pass   # not ours any more
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def abandon(target: Path) -> list[Path]:
    """Throw away an unfinished instant restore's copy (the user's writes with it); returns what it removed.

    Under the partial file's flock, so no daemon or restore is using it: the state file goes first, then
    the partial file. A kill in between leaves a partial file with no state file, a dead restore's, which
    this (run again) or the next restore removes. PATH itself is never touched."""
    removed: list[Path] = []
    path = partial_path(target)
    fd = open_existing(path, os.O_RDONLY)
    try:
        if fd is not None:
            try:
                _lock(fd, path)
            except RpfsError:
                if state_path(target).exists():
                    raise   # its daemon (or a resume) still works on it
                os.close(fd)   # with no state file it is another restore's, at work: not ours
                fd = None
        if fd is not None:
            _check_same(fd, path)
        if state_path(target).exists():
            state_path(target).unlink()
            fsync_folder(target.parent)   # gone before the partial file: never a state file without it
            removed.append(state_path(target))
        if fd is not None:
            path.unlink()
            fsync_folder(target.parent)
            removed.append(path)
    finally:
        if fd is not None:
            os.close(fd)
    return removed


def _remove_dead(target: Path) -> None:
    """Remove the partial file of a restore that died: nobody holds it and no instant restore owns it.
    It is unlinked rather than reused, so nothing of it (owner, links, open fds) carries over."""
    path = partial_path(target)
    fd = open_existing(path, os.O_RDONLY)
    if fd is None:
        return
    try:
        _lock(fd, path)
        _check_same(fd, path)
        if state_path(target).exists():
            raise RpfsError(f"{target} has an unfinished instant restore ({state_path(target)})")
        path.unlink()
    finally:
        os.close(fd)


def open_existing(path: Path, flags: int) -> int | None:
    """Open a regular file without following a link or blocking on a FIFO; None if there is none."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise RpfsError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RpfsError(f"{path} is not a regular file; remove it")
    return fd


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RpfsError(f"another restore is writing {path}; wait for it to finish") from None


def _check_same(fd: int, path: Path) -> None:
    """path still names the file open at fd (nothing replaced or removed it meanwhile)."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        here = None
    mine = os.fstat(fd)
    if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
        raise RpfsError(f"{path} changed while rpfs was using it; try again")
