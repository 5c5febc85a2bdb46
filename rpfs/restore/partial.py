"""The partial-file protocol: a restore into PATH writes PATH.rpfs-partial, renamed to PATH only when whole.

Full and instant restores both follow it, so PATH never holds half an image and two restores never
share a partial file:
- the partial file is created with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, and whoever writes it holds an
  exclusive flock on it for as long as it does;
- an instant restore also keeps PATH.rpfs-instant (its state: source and bitmap). While that exists the
  partial file holds the user's writes and belongs to that instant restore: nothing else touches it;
- a partial file with no state file beside it and nobody holding its flock was left by a restore that
  died: the next restore into PATH takes it over (under the flock) and starts it afresh, so running
  the same command again finishes the job.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from rpfs.errors import RpfsError

PARTIAL_SUFFIX = ".rpfs-partial"
STATE_SUFFIX = ".rpfs-instant"


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + PARTIAL_SUFFIX)


def state_path(target: Path) -> Path:
    """An instant restore's state file; its existence marks the partial file as that restore's."""
    return target.with_name(target.name + STATE_SUFFIX)


def check_free(target: Path) -> None:
    """Refuse, before anything is written, a target another restore is working on."""
    if state_path(target).exists():
        raise RpfsError(f"{target} has an unfinished instant restore ({state_path(target)}); finish it with"
                        " rpfs instant-restore (same VM, recovery point and disk), or choose another path")
    try:
        fd = os.open(partial_path(target), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise RpfsError(f"cannot open {partial_path(target)}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RpfsError(f"another restore is writing {partial_path(target)}; wait for it to finish") from None
    finally:
        os.close(fd)


def settle(target: Path) -> None:
    """Finish an instant restore that was killed between renaming its copy into place and deleting its
    state file: the state file without its partial file, beside a whole PATH, is stale."""
    if state_path(target).exists() and not partial_path(target).exists() and target.exists():
        state_path(target).unlink(missing_ok=True)


class PartialFile:
    """PATH.rpfs-partial, open and flocked by this process."""

    def __init__(self, target: Path, fd: int):
        self.target, self.path, self.fd = target, partial_path(target), fd

    @classmethod
    def create(cls, target: Path) -> "PartialFile":
        """Claim the partial file for a new restore, empty: made new, or taken over from a dead restore."""
        check_free(target)
        path = partial_path(target)
        taken_over = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            fd, taken_over = _open(path), True
        except OSError as e:
            raise RpfsError(f"cannot create {path}: {e.strerror}") from None
        partial = cls._locked(target, fd)
        try:
            if state_path(target).exists():   # an instant restore claimed it between our check and our lock
                raise RpfsError(f"{target} has an unfinished instant restore ({state_path(target)})")
            if taken_over:
                os.ftruncate(fd, 0)
                os.fchmod(fd, 0o600)
        except BaseException:
            partial.close()
            raise
        return partial

    @classmethod
    def resume(cls, target: Path) -> "PartialFile":
        """The partial file of an unfinished instant restore, for the one process that serves it."""
        try:
            fd = _open(partial_path(target))
        except RpfsError:
            if not partial_path(target).exists():
                raise RpfsError(f"{partial_path(target)} is missing: the unfinished instant restore into {target}"
                                " cannot be resumed (remove its state file to start anew)") from None
            raise
        return cls._locked(target, fd)

    @classmethod
    def _locked(cls, target: Path, fd: int) -> "PartialFile":
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            here = os.lstat(partial_path(target))
            mine = os.fstat(fd)
        except BlockingIOError:
            os.close(fd)
            raise RpfsError(f"another process is writing {partial_path(target)} (a restore into {target})") from None
        except FileNotFoundError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino) or not stat.S_ISREG(mine.st_mode):
            os.close(fd)
            raise RpfsError(f"{partial_path(target)} changed while it was being opened; try again")
        return cls(target, fd)

    def finish(self) -> None:
        """Sync, rename over PATH, sync the folder: from here on PATH is the whole image."""
        os.fsync(self.fd)
        os.replace(self.path, self.target)   # the open fd follows the file
        fsync_folder(self.target.parent)

    def discard(self) -> None:
        """Remove the partial file of a restore that failed (one that holds no user writes)."""
        try:
            here, mine = os.lstat(self.path), os.fstat(self.fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RpfsError(f"cannot open {path}: {e.strerror}") from None


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
