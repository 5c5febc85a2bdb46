"""Access control: what rpfs keeps is root's alone, and what root runs or obeys only root can change.

- Private: the store, the run dir and attach folders are 0700 and their files 0600, so another user can
  neither read them nor open (and so flock) a lock file. make_private tightens what an older rpfs made.
- Refused: a user who lacks a permission gets one line saying what refused them, whose it is, its mode.
- Trusted: a file root runs (pre/post scripts) or obeys (their config) is reached through folders only
  root can change, as OpenSSH's StrictModes checks, every link on the way is root's, and it is used
  through the descriptor that was checked, so a swap after the check changes nothing.
"""
from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from pathlib import Path

from rpfs.errors import RpfsError

PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600
MAX_LINKS = 40   # as the kernel's own limit on links followed in one lookup


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_id(name: str) -> int:
    """A group given by name (or number); one line when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise RpfsError(f"unknown group {name!r} (create it with groupadd, or give an existing one)") from None


def permission_denied(what: str, path: Path) -> RpfsError:
    """'WHAT: permission denied (it is root's, mode 0700)', naming what refuses (the first folder on the way
    the user cannot pass, or the nearest thing that exists) unless WHAT names it already: what a user who
    may not read or write is told, never a traceback."""
    path = Path(os.path.abspath(path))
    culprit = next((folder for folder in reversed(path.parents) if not os.access(folder, os.X_OK)), path)
    while not os.path.lexists(culprit) and culprit != culprit.parent:
        culprit = culprit.parent
    try:
        st = os.stat(culprit)
    except OSError:
        return RpfsError(f"{what}: permission denied")
    whose = f"{owner_name(st.st_uid)}'s, mode {stat.S_IMODE(st.st_mode):04o}"
    it = "it" if str(culprit) in what.split() else str(culprit)
    return RpfsError(f"{what}: permission denied ({it} is {whose})")


def make_private_folder(folder: Path) -> Path:
    """Create folder (and its missing parents) 0700, or tighten the existing one to 0700."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for path in reversed(missing):
        try:
            os.mkdir(path, PRIVATE_FOLDER)
        except FileExistsError:
            pass
    if stat.S_IMODE(os.stat(folder).st_mode) != PRIVATE_FOLDER:
        os.chmod(folder, PRIVATE_FOLDER)
    return folder


def make_private(folder: Path, depth: int = 2) -> None:
    """Tighten a folder rpfs keeps to 0700, and what it holds (depth levels down) to 0600 for files and 0700
    for folders; links are never followed. Best effort on read-only media (nobody can change them there)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _tighten_inside(fd, depth)
    finally:
        os.close(fd)


def _tighten_inside(folder_fd: int, depth: int) -> None:
    """The folder first: from then on nobody else can swap an entry for a link, so entries are changed by
    name. Files are never opened: closing a descriptor of lock.mdb would drop LMDB's fcntl lock on it."""
    _chmod(folder_fd, None, PRIVATE_FOLDER, os.fstat(folder_fd))
    if depth <= 0:
        return
    for entry in os.scandir(folder_fd):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue   # gone meanwhile
        if stat.S_ISREG(st.st_mode):
            _chmod(folder_fd, entry.name, PRIVATE_FILE, st)
        elif stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
            except FileNotFoundError:
                continue
            try:
                _tighten_inside(fd, depth - 1)
            finally:
                os.close(fd)


def _chmod(folder_fd: int, name: str | None, mode: int, st: os.stat_result) -> None:
    """Set the mode of the folder itself (name None) or of an entry of it, if it differs."""
    if stat.S_IMODE(st.st_mode) == mode:
        return
    try:
        if name is None:
            os.fchmod(folder_fd, mode)
        else:
            os.chmod(name, mode, dir_fd=folder_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.EROFS:
            raise


# -- trusted files: what root runs or obeys ------------------------------------------------------------
def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def check_trusted_folder(st: os.stat_result, folder: str, what: str, path: Path) -> None:
    """A folder root may trust: root's, and writable by nobody else. A sticky folder (/tmp) may be writable
    by all, since nobody else can then rename or remove root's entries in it; each entry is checked."""
    if not _trusted_owner(st.st_uid):
        raise RpfsError(f"{what} {path}: folder {folder} is not root's (it is {owner_name(st.st_uid)}'s);"
                        " every folder on the way must be root's and writable by nobody else; refusing to use it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise RpfsError(f"{what} {path}: folder {folder} is writable by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}); every folder on the way must be writable by root"
                        " only; refusing to use it")


def open_trusted(path: Path, what: str) -> int:
    """Open a file root will run or read as instructions, read-only; refused unless it is a regular file of
    root's that nobody else can write, reached through folders and links only root can change.

    Each step is taken relative to the folder checked before it, and links are followed by hand, so what
    was checked is what is opened; the caller uses the returned descriptor, never the path again."""
    path = Path(path)
    shown = path
    todo = [p for p in (str(path) if path.is_absolute() else f"{os.getcwd()}/{path}").split("/") if p not in ("", ".")]
    where: list[str] = []
    fd = _open_folder_checked(None, "/", "/", what, shown)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            last = not todo
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise RpfsError(f"{what} {shown} does not exist") from None
            except OSError as e:
                raise RpfsError(f"{what} {shown}: cannot look it up: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                link = "/" + "/".join([*where, name])
                if not _trusted_owner(st.st_uid):
                    raise RpfsError(f"{what} {shown}: the link {link} is not root's (it is"
                                    f" {owner_name(st.st_uid)}'s); refusing to follow it")
                links += 1
                if links > MAX_LINKS:
                    raise RpfsError(f"{what} {shown}: too many links on the way")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = -1, []
                    fd = _open_folder_checked(None, "/", "/", what, shown)
                todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            if last:
                return _open_file_checked(fd, name, what, shown)
            where = where[:-1] if name == ".." else [*where, name]
            new = _open_folder_checked(fd, name, "/" + "/".join(where), what, shown)
            os.close(fd)
            fd = new
        raise RpfsError(f"{what} {shown} is a folder, not a file")
    finally:
        if fd >= 0:
            os.close(fd)


def _open_folder_checked(dir_fd: int | None, name: str, folder: str, what: str, path: Path) -> int:
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except (NotADirectoryError, FileNotFoundError):
        raise RpfsError(f"{what} {path}: {folder} is not a folder") from None
    except OSError as e:
        raise RpfsError(f"{what} {path}: cannot open {folder}: {e.strerror}") from None
    try:
        check_trusted_folder(os.fstat(fd), folder, what, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_file_checked(dir_fd: int, name: str, what: str, path: Path) -> int:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise RpfsError(f"{what} {path}: cannot open it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RpfsError(f"{what} {path} is not a regular file; refusing to use it")
        if not _trusted_owner(st.st_uid):
            raise RpfsError(f"{what} {path} is not owned by root; refusing to use it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RpfsError(f"{what} {path} is writable by group or others (chmod go-w); refusing to use it")
    except BaseException:
        os.close(fd)
        raise
    return fd
