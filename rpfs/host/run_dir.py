"""/run/rpfs: the one folder where this host's daemons and attaches keep their state, and its layout.

    mount-<hash>.pid, mount-<hash>.log   the FUSE daemon serving a mountpoint (its log stays only if it
                                         has news: serve/daemon.py)
    instant/<hash>.json, instant/<hash>/ an instant restore into a target: its record for `rpfs jobs`,
                                         and the mountpoint of its writable image
    attach/<hash>.json, attach/<hash>/   a whole-VM attach at a destination: its record, and the private
                                         store mount its disks are read through
    freeze/<hash>.lock                   flocked by a backup's freeze watchdog for as long as it runs
                                         (backup/quiesce.py)
    freeze/guest-<hash>.lock             the same for a libvirt domain's guest, by its UUID
                                         (vm/guest_watchdog.py)
    libvirt/<uuid>.lock                  flocked by a backup of that libvirt domain while it runs: one
                                         at a time on this host, whatever the store (backup/vm_backup.py)

Each name is a hash of the path it stands for, so any path maps to one safe file name. Every folder is
root's, mode 0700 (an older rpfs made the run dir and instant/ 0711, so that a VM's qemu running as
another user could reach an instant image by its path; qemu runs as root here, and the image is root's
alone: serve/writable_tree.py). Files are written 0600 without following links and renamed into place,
so a record is either whole or absent; another user can open none of them, so can flock none.
RPFS_RUN_DIR moves the folder (the tests use a temporary one).
"""
from __future__ import annotations

import hashlib
import os
import stat
import uuid
from pathlib import Path

from rpfs.errors import RpfsError
from rpfs.host.access import PRIVATE_FOLDER, check_trusted_place
from rpfs.host.files import write_whole

def root() -> Path:
    return Path(os.environ.get("RPFS_RUN_DIR", "/run/rpfs"))


def daemon_files(mountpoint: Path) -> tuple[Path, Path]:
    """(pid file, log file) of the daemon serving mountpoint."""
    name = f"mount-{_key(mountpoint, 16)}"
    return root() / f"{name}.pid", root() / f"{name}.log"


def instant_files(target: Path) -> tuple[Path, Path]:
    """(record, mountpoint of the writable image) of the instant restore into target."""
    key = _key(target, 12)
    return root() / "instant" / f"{key}.json", root() / "instant" / key


def instant_records() -> list[Path]:
    return sorted((root() / "instant").glob("*.json"))


def attach_files(dest: Path) -> tuple[Path, Path]:
    """(record, private store mountpoint) of a whole-VM attach at dest."""
    key = _key(dest, 12)
    return root() / "attach" / f"{key}.json", root() / "attach" / key


def open_freeze_lock(mountpoint: str) -> int:
    """The lock file of a filesystem that backups freeze (kept, shared: not O_EXCL), opened read-write."""
    return _open_lock(root() / "freeze", f"{_key(Path(mountpoint), 16)}.lock")


def open_guest_freeze_lock(domain_uuid: str) -> int:
    """The lock file of a libvirt domain whose guest backups freeze, by the domain's UUID (as above)."""
    return _open_lock(root() / "freeze", f"guest-{_key(Path(domain_uuid), 16)}.lock")


def open_domain_backup_lock(domain_uuid: str) -> int:
    """The lock file a backup of a libvirt domain holds while it runs (as above); named by the UUID itself,
    in its canonical form (anything else is refused by uuid.UUID)."""
    return _open_lock(root() / "libvirt", f"{uuid.UUID(domain_uuid)}.lock")


def _open_lock(folder: Path, name: str) -> int:
    """A lock file in a folder of the run dir: kept and shared (not O_EXCL), 0600, never through a link."""
    return os.open(make_folder(folder) / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def make_folder(folder: Path) -> Path:
    """Create a folder of the run dir (and the run dir), 0700; refuse one that is a link or not ours."""
    mode = PRIVATE_FOLDER
    check_trusted_place(root(), "run dir")   # the folders above it too (RPFS_RUN_DIR may move it anywhere)
    for path in reversed([folder, *[p for p in folder.parents if p == root() or root() in p.parents]]):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as e:
            raise RpfsError(f"cannot create {path}: {e.strerror}") from None
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise RpfsError(f"{path} is not a folder of this user's (a link, or someone else's); remove it")
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)   # made by an older rpfs, or under another umask
    return folder


def write_file(path: Path, text: str) -> None:
    """A whole file in the run dir: 0600, never through a planted link, renamed into place."""
    write_whole(make_folder(path.parent) / path.name, text.encode())


def open_log(path: Path) -> int:
    """A daemon's log file, appended to: 0600, never through a planted link."""
    make_folder(path.parent)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _key(path: Path, length: int) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:length]
