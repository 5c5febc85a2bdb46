"""Access control: what rpfs keeps is root's alone, and what root runs or obeys only root can change.

- Private: the store, the run dir and attach folders are 0700 and their files 0600, so another user can
  neither read them nor open (and so flock) a lock file. make_private tightens what an older rpfs made.
- Refused: a user who lacks a permission gets one line saying what refused them, whose it is, its mode.
- Trusted: a file root runs (pre/post scripts) or obeys (their config) is reached through folders only
  root can change, as OpenSSH's StrictModes checks, every link on the way is root's, and it is used
  through the descriptor that was checked, so a swap after the check changes nothing.
- Trusted places: where root creates, tightens, writes or mounts over what a user named (a store, an
  attach destination, a restore target, a mountpoint) is reached through folders only root can change and
  links of root's (check_trusted_place), so nobody else can point root at something of their choosing; a
  place root writes in is root's and writable by root alone, and what root opens there by name is no link
  (check_own_entry).
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


def make_private_folder(folder: Path, what: str = "folder") -> Path:
    """Create folder (and its missing parents) 0700, or tighten the existing one to 0700; refused in a place
    another user could have prepared, or when it is someone else's or others can write it
    (check_trusted_place, private). Checked again once made: a name another user took in a sticky folder
    between the check and our mkdir is theirs, and refused then, before the chmod. A link of root's to it
    (checked) is followed: what is missing is made where it leads."""
    check_trusted_place(folder, what, private=True)
    real = Path(os.path.realpath(folder))
    missing = [p for p in [real, *real.parents] if not os.path.lexists(p)]
    for path in reversed(missing):
        try:
            os.mkdir(path, PRIVATE_FOLDER)
        except FileExistsError:
            pass
    check_trusted_place(folder, what, private=True)
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
                    raise _untrusted_place(what, shown, f"{link} is a symbolic link owned by {_whose(st.st_uid)}")
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
        _check_folder(os.fstat(fd), folder, what, path)
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


# -- trusted places: where root creates, tightens, writes or mounts over what a user named ---------------
def check_trusted_place(path: Path, what: str, private: bool = False) -> None:
    """Refuse a place another user could have prepared or could swap: a link on the way (the place itself
    included) is another user's or, for the place itself, lies in a folder others can write; or a folder on
    the way is writable by someone else. A sticky folder writable by all (/tmp) is fine when what is next in
    it is root's (nobody else may rename or remove that) or not there yet (root makes it: make_private_folder
    checks again once it is made). Links of root's are followed, and where they lead is checked the same way.

    private: root writes in the place itself (a store, an attach DEST, a restore folder), so when it exists
    it must be root's and writable by nobody else, sticky or not: every name in it is then root's to give.

    The path is taken as the kernel takes it: `..` goes up from the real folder reached so far (through the
    links followed), never from the spelling. Once this passes, nobody but root can change the way to the
    place, so the path can be used after it. Only what this user can look up is checked: one who cannot
    reach the place is told by the command."""
    given = os.fspath(path)
    shown = Path(given if given.startswith("/") else f"{os.getcwd()}/{given}")
    todo = [p for p in str(shown).split("/") if p not in ("", ".")]
    folder = "/"
    try:
        open_to_others = _check_folder(os.lstat(folder), folder, what, shown)
        links = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                folder = os.path.dirname(folder)   # folder is real: every link before it was resolved by hand
                open_to_others = _check_folder(os.lstat(folder), folder, what, shown)
                continue
            here = os.path.join(folder, name)
            it = "it" if here == str(shown) else here
            try:
                st = os.lstat(here)
            except (FileNotFoundError, NotADirectoryError):
                return   # root makes it (or the command says it is not there)
            if stat.S_ISLNK(st.st_mode):
                if not _trusted_owner(st.st_uid):
                    raise _untrusted_place(what, shown, f"{it} is a symbolic link owned by {_whose(st.st_uid)}")
                if not todo and open_to_others:   # root's, but named in a folder anyone may write: give the real path
                    raise _untrusted_place(what, shown, f"{it} is a symbolic link in {folder}, which others can"
                                           " write (give the real path)")
                links += 1
                if links > MAX_LINKS:
                    raise _untrusted_place(what, shown, "too many links on the way")
                target = os.readlink(here)
                if target.startswith("/"):
                    folder = "/"
                    open_to_others = _check_folder(os.lstat(folder), folder, what, shown)
                todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            if open_to_others and not _trusted_owner(st.st_uid):
                raise _untrusted_place(what, shown, f"{here} is owned by {_whose(st.st_uid)}, in {folder},"
                                       " which others can write")
            if not todo:
                break   # the place itself
            if not stat.S_ISDIR(st.st_mode):
                return   # the command says it is no folder
            open_to_others = _check_folder(st, here, what, shown)
            folder = here
        else:
            here, st = folder, os.lstat(folder)   # the place is a folder reached by `..` (or /)
        if private:
            _check_private(st, "it" if here == str(shown) else here, what, shown)
    except PermissionError:
        return


def _check_folder(st: os.stat_result, folder: str, what: str, path: Path) -> bool:
    """The folder rule, for places and for files root runs or obeys alike: a folder on the way is root's and
    writable by nobody else; True if it is sticky and others can write it (then what is next in it must be
    root's, since nobody else may rename or remove that)."""
    if not _trusted_owner(st.st_uid):
        raise _untrusted_place(what, path, f"{folder} is writable by {_whose(st.st_uid)}, its owner")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not st.st_mode & stat.S_ISVTX:
        raise _untrusted_place(what, path, f"{folder} is writable by {_writers(st)} ({_mode(st)})")
    return bool(writable)


def _check_private(st: os.stat_result, it: str, what: str, path: Path) -> None:
    """A place root writes in: root's, and writable by nobody else (a sticky bit does not help here: what
    another user makes in it is theirs to swap)."""
    if not _trusted_owner(st.st_uid):
        why = f"{it} is owned by {_whose(st.st_uid)}"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"{it} is writable by {_writers(st)} ({_mode(st)})"
    else:
        return
    raise _untrusted_place(what, path, why, "root writes in it, so it must be root's and writable by root only")


def check_own_entry(path: Path, what: str, folder: bool = False) -> None:
    """Refuse a file (or folder) that root opens by name in a place of its own, unless absent or a real one
    of root's: a link there (lock.mdb -> /etc/shadow) would have root write where it points."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    kind, is_kind = ("folder", stat.S_ISDIR) if folder else ("regular file", stat.S_ISREG)
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not is_kind(st.st_mode):
        why = f"is no {kind}"
    elif not _trusted_owner(st.st_uid):
        why = f"is owned by {_whose(st.st_uid)}"
    else:
        return
    raise RpfsError(f"refusing {what}: {path} {why}; root opens it by name, so it must be a {kind} of root's"
                    " (remove it)")


def _untrusted_place(what: str, path: Path, why: str, advice: str = "choose a place only root can change") -> RpfsError:
    return RpfsError(f"refusing {what} {path}: {why}; {advice}")


def _writers(st: os.stat_result) -> str:
    return "anyone" if st.st_mode & stat.S_IWOTH else f"group {_group_name(st.st_gid)}"


def _mode(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}"


def _whose(uid: int) -> str:
    name = owner_name(uid)
    return name if name.startswith("uid ") else f"{name} (uid {uid})"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"
