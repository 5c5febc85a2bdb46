"""Files and folders copied out of a recovery point's filesystem (`rpfs restore-files`), mounted read-only
by the caller. What a guest wrote is untrusted: its links, names and modes never steer where root writes.
The proofs: docs/design/restore-files.md.

- Never outside TO: a user-named path is walked one component at a time, each opened with
  openat(O_NOFOLLOW) from the folder before it; a link on the way, or `..`, is refused in one line. Inside,
  every entry is read relative to its folder's descriptor and made relative to its new folder's descriptor
  (mkdirat, openat(O_CREAT|O_EXCL|O_NOFOLLOW), symlinkat, mknodat); metadata is set on the descriptor or
  with AT_SYMLINK_NOFOLLOW, never on a path that could be a link. A link is copied as a link (its target
  verbatim) and never followed, here or later. A name holding `/`, or `.`/`..`, is never used.
- Whole or absent, kill -9 at any moment: everything is copied into the staging folder `TO/.rpfs-restore-files`
  (0700) under `tree/`, made durable (syncfs), then each entry is renamed into place, then the staging
  folder is removed. Its record `job.json` (_Record: the job's paths and options, every name in TO that an
  unfinished run of this job may have put there, its phase, and each entry renamed aside) is written whole
  before the copy, before the first rename and before each rename aside, and removed last. A kill leaves
  in TO only whole entries: some restored paths in place, others not yet, and one replaced entry may be
  aside. A run that finds a staging folder without a record removes it. With a record of this same job,
  it first puts back each entry renamed aside whose place is empty (never over something), then empties
  the staging folder; the recorded names are no reason to refuse (they are replaced) and are carried into
  its own record. So the same command again finishes the job, however often it is killed, and what was
  replaced is removed only once every new entry is in place. Another job is refused while that record
  shows renames begun (only that job puts back what it put aside); before, its staging is dropped. One
  run at a time per TO (flock); the staging folder hands down no ACL or set-group-id bit of TO's. A path
  named in the staging folder is refused; the source's own top-level entry of that name is skipped.
- Replacing (--force, or the same job again): an entry at a restored path is renamed aside into the staging
  folder, then the new one renamed in; a folder on the way to a restored path that exists already is
  entered (what else it holds stays), anything else in its place is replaced. Nothing is followed.
- Metadata: mode, owner and group (numbers), atime and mtime (ns), every extended attribute root may
  copy (user.*, trusted.*, security.*, and the POSIX ACLs: system.posix_acl_access and _default), set
  after the content (a folder after what it holds, so its times and default ACL stay as they were).
  Not copied: ctime and birth time (the kernel sets them), chattr flags. Hard links within one restore
  become separate files.
- Sparse files stay sparse: only the data ranges (SEEK_DATA/SEEK_HOLE) are written, then the size is set.
- Privilege only when asked: device files are restored with `devices`, else skipped and listed; set-user-id
  and set-group-id bits of non-folders, and file capabilities (security.capability), only with `setuid`,
  else cleared and listed. Sockets are skipped and listed (a program makes its own when it listens).
- A read error (EIO from a damaged point) fails the restore with one line naming the path; the staging
  folder is never renamed into place and the next run removes it. So is a tree nested deeper than
  MAX_DEPTH folders (the copy recurses).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rpfs.errors import EXIT_CORRUPT, RpfsError
from rpfs.host.access import PRIVATE_FOLDER, check_trusted_place, make_private_folder
from rpfs.host.files import write_whole
from rpfs.host.libc import rename_noreplace, sync_filesystem
from rpfs.host.untrusted import parse_json, shown

STAGING = ".rpfs-restore-files"   # in TO: the staging folder
TREE = "tree"                     # in it: what is copied, laid out as in TO
ASIDE = "replaced"                # in it: what the renames replaced, removed with it
RECORD = "job.json"               # in it: the job and the names it may have put in TO, removed last
MAX_RECORD = 16 << 20
CHUNK = 1 << 20
MAX_DEPTH = 200                   # folders within folders: two descriptors and three calls deep each
CAPABILITY = "security.capability"
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RestoreOptions:
    force: bool = False      # restore into a non-empty --to, replacing what is at the same paths
    devices: bool = False    # restore device files (block/char); else skipped and listed
    setuid: bool = False     # keep set-user-id / set-group-id bits (and file capabilities); else cleared, listed


@dataclass
class Skipped:
    """An entry not restored. Paths are as inside the point, exact (os.fsdecode): escape them to print."""
    path: str
    why: str


@dataclass
class RestoreSummary:
    files: int = 0
    folders: int = 0
    links: int = 0
    other: int = 0           # FIFOs and device files
    bytes: int = 0           # the restored files' sizes, holes included
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)   # paths whose set-user-id/-group-id bits or capabilities went


@dataclass
class _Wanted:
    """A folder of the tree of user-named paths: `named` means it is restored whole."""
    named: bool = False
    children: dict[str, _Wanted] = field(default_factory=dict)


def restore_files(fs_root: Path, paths: list[str], to: Path, options: RestoreOptions,
                  progress: Callable[[int, int], None] | None = None) -> RestoreSummary:
    """Copy each of paths (absolute, inside the filesystem mounted at fs_root) to the same path under `to`,
    which must be empty or new (or options.force); the folders on the way get their source's metadata."""
    started = time.monotonic()
    wanted, normalized = _plan(paths)
    to = Path(to)
    try:
        root_fd = os.open(fs_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise RpfsError(f"cannot open the point's filesystem at {fs_root}: {e.strerror}") from None
    try:
        total = _Walk(root_fd).check(wanted)   # every refusal before anything is written
        to_fd = _open_target(to)
        try:
            _lock(to_fd, to)
            job = {"paths": normalized, "force": options.force, "devices": options.devices,
                   "setuid": options.setuid}
            before = _unfinished(to_fd, to, job)
            same = before is not None and before["job"] == job
            carried = sorted(set(before["names"])) if same else []
            _check_empty(to_fd, to, options.force, set(carried))
            copier = _Copier(options, to, total, progress)
            record = _Record(to / STAGING / RECORD, job, carried)
            try:
                with _private_folder(STAGING, to_fd) as staging_fd:
                    if same:
                        _put_back(to_fd, staging_fd, before["asides"])
                    record.write("copying")   # what is left in the staging folder is no one's now
                    _remove(TREE, staging_fd)
                    _remove(ASIDE, staging_fd)
                    with _private_folder(TREE, staging_fd) as tree_fd, _private_folder(ASIDE, staging_fd) as aside_fd:
                        copier.stage(root_fd, tree_fd, wanted, "")
                        sync_filesystem(tree_fd)
                        record.names = sorted(set(carried) | set(os.listdir(tree_fd)))
                        record.write("renaming")
                        _Mover(aside_fd, record).move(tree_fd, to_fd, wanted, [])
                    _remove(TREE, staging_fd)
                    _remove(ASIDE, staging_fd)   # only now: every new entry is in place
                    os.unlink(RECORD, dir_fd=staging_fd)   # the job is done: the record goes last
                _remove(STAGING, to_fd)
                os.fsync(to_fd)
            except OSError as e:   # TO's own folders (what is restored says its path: _Copier._write)
                raise RpfsError(f"cannot restore into {to}: {e.strerror}") from None
        finally:
            os.close(to_fd)
    finally:
        os.close(root_fd)
    summary = copier.summary
    summary.seconds = time.monotonic() - started
    return summary


# -- what the user named ----------------------------------------------------------------------------------
def _plan(paths: list[str]) -> tuple[_Wanted, list[str]]:
    """The named paths as a tree (a path inside another named one is covered by it), and their normal form;
    `..`, relative paths and NUL are refused."""
    if not paths:
        raise RpfsError("name at least one path to restore (as /etc/nginx/nginx.conf, or / for everything)")
    root = _Wanted()
    normalized = set()
    for path in paths:
        if not path.startswith("/") or "\0" in path:
            raise RpfsError(f"{shown(path)}: a path inside the point starts with / (as /etc/nginx/nginx.conf)")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise RpfsError(f"refusing {shown(path)}: `..` in a path to restore (name the folder it means)")
        if parts and parts[0] == STAGING:
            raise RpfsError(f"refusing {shown(path)}: /{STAGING} is the name of rpfs's staging folder in --to;"
                            " it is never restored")
        normalized.add("/" + "/".join(parts))
        node = root
        for part in parts:
            if node.named:
                break
            node = node.children.setdefault(part, _Wanted())
        else:
            node.named, node.children = True, {}
    return root, sorted(normalized)


class _Walk:
    """The first walk, before anything is written: every named path exists and is reached through real
    folders; the total size of what will be copied, for progress."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd

    def check(self, wanted: _Wanted) -> int:
        return self._folder(self.root_fd, wanted, "")

    def _folder(self, fd: int, wanted: _Wanted, prefix: str) -> int:
        if wanted.named:
            return self._size_of_folder(fd, prefix, 0)
        total = 0
        for name, child in sorted(wanted.children.items()):
            path = f"{prefix}/{name}"
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                raise RpfsError(f"{shown(_named_below(child, path))} not found in the point") from None
            except OSError as e:
                raise _read_error(path, e) from None
            if child.named:
                total += self._size(fd, name, st, path, 0)
                continue
            if stat.S_ISLNK(st.st_mode):
                target = _reading(path, os.readlink, name, dir_fd=fd)
                raise RpfsError(f"refusing {shown(_named_below(child, path))}: {shown(path)} is a symbolic link in"
                                f" the point (to {shown(target)}); name the path it leads to")
            if not stat.S_ISDIR(st.st_mode):
                raise RpfsError(f"{shown(_named_below(child, path))} not found in the point ({shown(path)} is"
                                " not a folder)")
            with _opened(name, fd, path) as sub:
                total += self._folder(sub, child, path)
        return total

    def _size(self, fd: int, name: str, st: os.stat_result, path: str, depth: int) -> int:
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if not stat.S_ISDIR(st.st_mode):
            return 0
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        with _opened(name, fd, path) as sub:
            return self._size_of_folder(sub, path, depth + 1)

    def _size_of_folder(self, fd: int, path: str, depth: int) -> int:
        total = 0
        for name in _entries(fd, path):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                raise _read_error(f"{path}/{name}", e) from None
            total += self._size(fd, name, st, f"{path}/{name}", depth)
        return total


def _named_below(wanted: _Wanted, path: str) -> str:
    """The first user-named path at or below this node (for a line that names what the user asked for)."""
    while not wanted.named and wanted.children:
        name, wanted = next(iter(sorted(wanted.children.items())))
        path = f"{path}/{name}"
    return path


# -- TO and its staging folder ----------------------------------------------------------------------------
def _open_target(to: Path) -> int:
    """TO, checked as rpfs restore checks its folder (root writes in it), made 0700 if new."""
    check_trusted_place(to, "restore folder", private=True)
    if os.path.lexists(to) and not os.path.isdir(to):
        raise RpfsError(f"{to} is not a folder (--to names a folder to restore the files under)")
    try:
        if not os.path.exists(to):
            make_private_folder(to, "restore folder")
        return os.open(to, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise RpfsError(f"cannot make the restore folder {to}: {e.strerror}") from None


def _lock(to_fd: int, to: Path) -> None:
    """One restore-files into a folder at a time; the kernel drops the lock with the process."""
    try:
        fcntl.flock(to_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RpfsError(f"another restore-files is writing into {to}; wait for it to finish") from None


@dataclass
class _Record:
    """job.json: the job, the names in TO it may have put there, its phase ("copying": nothing renamed
    yet; "renaming"), and each entry the renames put aside as [its name in replaced/, its path in TO as
    names]. Written whole (and durable) before the copy, before the first rename and before each rename
    aside, so that a run that finds it can put back what a killed run took away."""
    path: Path
    job: dict
    names: list[str]
    asides: list[list] = field(default_factory=list)
    phase: str = "copying"

    def write(self, phase: str) -> None:
        self.phase = phase
        write_whole(self.path, _json({"job": self.job, "names": self.names, "phase": phase, "asides": self.asides}),
                    durable=True)

    def aside(self, name: str, parts: list[str]) -> None:
        self.asides.append([name, parts])
        self.write(self.phase)


def _unfinished(to_fd: int, to: Path, job: dict) -> dict | None:
    """The record of the job a killed run left in TO. A staging folder without one (empty, or left before
    a record was written or after it was removed) holds nothing of a job and is removed; another job's
    record that shows renames begun is a refusal: what it put aside is put back only by that job."""
    try:
        st = os.stat(STAGING, dir_fd=to_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    record = _read_record(to_fd) if stat.S_ISDIR(st.st_mode) else None
    if record is None:
        try:
            _remove(STAGING, to_fd)
        except OSError as e:
            raise RpfsError(f"cannot restore into {to}: {e.strerror}") from None
        return None
    if record["job"] != job and record["phase"] != "copying":
        paths = record["job"].get("paths")
        named = "other paths"
        if isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths):
            named = shown(paths[0]) + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        raise RpfsError(f"{to} holds an unfinished restore-files of {named}: run that same command again to finish"
                        f" it, or remove {to / STAGING} by hand after checking it")
    return record


def _read_record(to_fd: int) -> dict | None:
    """The record an unfinished run of a job left (_Record), or None if there is none, or none sound."""
    try:
        fd = os.open(f"{STAGING}/{RECORD}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=to_fd)
    except OSError:
        return None
    try:
        raw = os.read(fd, MAX_RECORD)
    finally:
        os.close(fd)
    try:
        record = parse_json(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("job"), dict) \
            or not isinstance(record.get("names"), list) \
            or not all(isinstance(n, str) for n in record["names"]):
        return None
    record.setdefault("phase", "renaming")   # unknown: renames may have begun
    asides = record.setdefault("asides", [])
    if not isinstance(asides, list) or not all(_sound_aside(a) for a in asides):
        return None
    return record


def _sound_aside(aside) -> bool:
    return isinstance(aside, list) and len(aside) == 2 and isinstance(aside[0], str) and aside[0].isdigit() \
        and isinstance(aside[1], list) and aside[1] != [] \
        and all(isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\0" not in n for n in aside[1])


def _put_back(to_fd: int, staging_fd: int, asides: list[list]) -> None:
    """Each entry a killed run renamed aside goes back to its place if that is empty (the new entry never
    came), never over something: the old entry is never lost to a kill or to a run that then fails."""
    try:
        aside_fd = os.open(ASIDE, _DIR, dir_fd=staging_fd)
    except FileNotFoundError:
        return
    try:
        for name, parts in asides:
            try:
                os.stat(name, dir_fd=aside_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue   # never put aside, or put back already
            folder = os.dup(to_fd)
            try:
                for part in parts[:-1]:
                    inner = os.open(part, _DIR, dir_fd=folder)
                    os.close(folder)
                    folder = inner
                rename_noreplace(aside_fd, name, folder, parts[-1])
                os.fsync(folder)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                # its place holds something (the new entry) or is gone: what was put aside goes
            finally:
                os.close(folder)
    finally:
        os.close(aside_fd)


def _check_empty(to_fd: int, to: Path, force: bool, allowed: set[str]) -> None:
    others = sorted(n for n in os.listdir(to_fd) if n != STAGING and n not in allowed)
    if others and not force:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise RpfsError(f"{to} is not empty (it holds {shown(others[0])}{more}): restore into an empty or new"
                        " folder, or add --force to replace what is at the same paths")


@contextmanager
def _private_folder(name: str, dir_fd: int) -> Iterator[int]:
    """A folder of rpfs's own (made, or the one a killed run left), 0700, that gives what is made in it
    nothing: no ACL inherited from TO (a default ACL would add entries to every restored file), no
    set-group-id."""
    try:
        os.mkdir(name, PRIVATE_FOLDER, dir_fd=dir_fd)
    except FileExistsError:
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            _remove(name, dir_fd)
            os.mkdir(name, PRIVATE_FOLDER, dir_fd=dir_fd)
    with _opened(name, dir_fd) as fd:
        for acl in ("system.posix_acl_default", "system.posix_acl_access"):
            try:
                os.removexattr(fd, acl)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        os.fchmod(fd, PRIVATE_FOLDER)
        yield fd


def _remove(name: str, dir_fd: int) -> None:
    """An entry of rpfs's own, if there: removed without following a link (rmtree is descriptor-based)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


# -- copying into the staging folder ----------------------------------------------------------------------
class _Copier:
    """Copies entries from a source folder's descriptor into a staged folder's descriptor."""

    def __init__(self, options: RestoreOptions, to: Path, total: int, progress: Callable[[int, int], None] | None):
        self.options, self.to, self.total, self.progress = options, to, total, progress
        self.done = 0
        self.summary = RestoreSummary()

    def stage(self, src: int, dst: int, wanted: _Wanted, prefix: str) -> None:
        """The named paths below a folder; the folders on the way made with their source's metadata."""
        if wanted.named:
            self._copy_entries(src, dst, prefix, 0)
            return
        for name, child in sorted(wanted.children.items()):
            path = f"{prefix}/{name}"
            if child.named:
                self._copy(src, dst, name, path, 0)
                continue
            with _opened(name, src, path) as sub_src:
                st = os.fstat(sub_src)
                self._write(path, os.mkdir, name, PRIVATE_FOLDER, dir_fd=dst)
                with _opened(name, dst) as sub_dst:
                    self.stage(sub_src, sub_dst, child, path)
                    self._set_metadata(sub_src, sub_dst, st, path, folder=True)

    def _copy_entries(self, src: int, dst: int, path: str, depth: int) -> None:
        for name in _entries(src, path):
            self._copy(src, dst, name, f"{path}/{name}", depth)

    def _copy(self, src: int, dst: int, name: str, path: str, depth: int) -> None:
        if path == f"/{STAGING}":
            self.summary.skipped.append(Skipped(path, "the name of rpfs's staging folder (not restored)"))
            return
        st = _reading(path, os.stat, name, dir_fd=src, follow_symlinks=False)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            self._copy_file(src, dst, name, path)
        elif kind == stat.S_IFDIR:
            self._copy_folder(src, dst, name, path, depth)
        elif kind == stat.S_IFLNK:
            self._copy_link(src, dst, name, path, st)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK) and not self.options.devices:
            self.summary.skipped.append(Skipped(path, "device file (add --devices)"))
        elif kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
            self._make_node(src, dst, name, path, st)
        else:
            self.summary.skipped.append(Skipped(path, "socket (not restored: a program makes its own)"))

    def _copy_file(self, src: int, dst: int, name: str, path: str) -> None:
        source = _reading(path, os.open, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC,
                          dir_fd=src)
        try:
            st = os.fstat(source)
            if not stat.S_ISREG(st.st_mode):
                raise RpfsError(f"cannot read {shown(path)} in the point: it changed while it was read")
            target = self._write(path, os.open, name,
                              os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst)
            try:
                self._copy_data(source, target, st.st_size, path)
                self._set_metadata(source, target, st, path, folder=False)
            finally:
                os.close(target)
        finally:
            os.close(source)
        self.summary.files += 1
        self.summary.bytes += st.st_size

    def _copy_data(self, source: int, target: int, size: int, path: str) -> None:
        """Only the data ranges are written: the holes between them stay holes."""
        offset = 0
        for start, end in _data_ranges(source, size, path):
            self._advance(start - offset)
            while start < end:
                chunk = _reading(path, os.pread, source, min(CHUNK, end - start), start)
                if not chunk:
                    raise RpfsError(f"cannot read {shown(path)} in the point: it ended before its size")
                written = 0
                while written < len(chunk):
                    written += self._write(path, os.pwrite, target, chunk[written:], start + written)
                start += len(chunk)
                self._advance(len(chunk))
            offset = end
        self._advance(size - offset)
        self._write(path, os.ftruncate, target, size)

    def _copy_folder(self, src: int, dst: int, name: str, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        with _opened(name, src, path) as sub_src:
            st = os.fstat(sub_src)
            self._write(path, os.mkdir, name, PRIVATE_FOLDER, dir_fd=dst)
            with _opened(name, dst) as sub_dst:
                self._copy_entries(sub_src, sub_dst, path, depth + 1)
                self._set_metadata(sub_src, sub_dst, st, path, folder=True)
        self.summary.folders += 1

    def _copy_link(self, src: int, dst: int, name: str, path: str, st: os.stat_result) -> None:
        target = _reading(path, os.readlink, name, dir_fd=src)
        self._write(path, os.symlink, target, name, dir_fd=dst)
        self._set_metadata_by_name(src, dst, name, st, path)
        self.summary.links += 1

    def _make_node(self, src: int, dst: int, name: str, path: str, st: os.stat_result) -> None:
        """A FIFO or a device file, made with mknod; its metadata set through an O_PATH descriptor (opening
        a device to set its mode could have effects)."""
        self._write(path, os.mknod, name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dst)
        self._set_metadata_by_name(src, dst, name, st, path)
        node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst)
        try:
            if stat.S_IFMT(os.fstat(node).st_mode) != stat.S_IFMT(st.st_mode):
                raise RpfsError(f"{self._shown(path)} changed while it was restored")
            self._write(path, os.chmod, f"/proc/self/fd/{node}", self._mode(st, path, folder=False))
        finally:
            os.close(node)
        self.summary.other += 1

    def _set_metadata(self, source: int, target: int, st: os.stat_result, path: str, folder: bool) -> None:
        """On descriptors: owner first (a chown clears set-user-id bits and capabilities), then the extended
        attributes (the ACLs among them), the mode, and the times last."""
        self._write(path, os.fchown, target, st.st_uid, st.st_gid)
        self._copy_xattrs(source, target, path, follow=True)
        self._write(path, os.fchmod, target, self._mode(st, path, folder))
        self._write(path, os.utime, target, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _set_metadata_by_name(self, src: int, dst: int, name: str, st: os.stat_result, path: str) -> None:
        """For links and nodes (no descriptor to set them on): by name in their folder, never followed."""
        self._write(path, os.chown, name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
        self._copy_xattrs(f"/proc/self/fd/{src}/{name}", f"/proc/self/fd/{dst}/{name}", path, follow=False)
        self._write(path, os.utime, name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)

    def _copy_xattrs(self, source: int | str, target: int | str, path: str, follow: bool) -> None:
        extra = {} if follow else {"follow_symlinks": False}   # a descriptor takes no follow_symlinks
        try:
            names = os.listxattr(source, **extra)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise _read_error(path, e) from None
        for name in names:
            if name == CAPABILITY and not self.options.setuid:
                self._cleared(path)
                continue
            try:
                value = os.getxattr(source, name, **extra)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                raise _read_error(path, e) from None
            try:
                os.setxattr(target, name, value, **extra)
            except OSError as e:
                raise RpfsError(f"cannot restore {self._shown(path)}: its extended attribute {shown(name)}:"
                                f" {e.strerror}") from None

    def _mode(self, st: os.stat_result, path: str, folder: bool) -> int:
        """The permission bits; set-user-id and set-group-id only when asked (on a folder, set-group-id only
        says its new entries take its group, and stays)."""
        mode = stat.S_IMODE(st.st_mode)
        if not folder and mode & PRIVILEGE_BITS and not self.options.setuid:
            mode &= ~PRIVILEGE_BITS
            self._cleared(path)
        return mode

    def _cleared(self, path: str) -> None:
        if not self.summary.cleared or self.summary.cleared[-1] != path:
            self.summary.cleared.append(path)

    def _advance(self, count: int) -> None:
        self.done += count
        if self.progress is not None and count:
            self.progress(self.done, self.total)

    def _shown(self, path: str) -> str:
        return shown(f"{self.to}{path}")

    def _write(self, path: str, call, *args, **kwargs):
        """call(...) on the staged copy of path; an error is one line naming where it goes in TO."""
        try:
            return call(*args, **kwargs)
        except OSError as e:
            raise RpfsError(f"cannot restore {self._shown(path)}: {e.strerror}") from None


def _data_ranges(fd: int, size: int, path: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each data range, by SEEK_DATA/SEEK_HOLE."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # no data after offset
                return
            raise _read_error(path, e) from None
        end = min(_reading(path, os.lseek, fd, start, os.SEEK_HOLE), size)
        if start >= end:
            return
        yield start, end
        offset = end


# -- moving into place ------------------------------------------------------------------------------------
class _Mover:
    """Renames each staged entry into place: a restored path replaces what is there (recorded, then
    renamed aside first), a folder on the way that exists already is entered."""

    def __init__(self, aside_fd: int, record: _Record):
        self.aside_fd, self.record = aside_fd, record
        self.replaced = 0

    def move(self, staged: int, target: int, wanted: _Wanted, parts: list[str]) -> None:
        for name in sorted(os.listdir(staged)):
            child = None if wanted.named else wanted.children.get(name)
            restored = child is None or child.named
            try:
                st = os.stat(name, dir_fd=target, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not restored and stat.S_ISDIR(st.st_mode):
                with _opened(name, staged) as sub_staged, _opened(name, target) as sub_target:
                    self.move(sub_staged, sub_target, child, parts + [name])
                continue
            if st is not None:
                self.replaced += 1
                self.record.aside(str(self.replaced), parts + [name])
                os.rename(name, str(self.replaced), src_dir_fd=target, dst_dir_fd=self.aside_fd)
            os.rename(name, name, src_dir_fd=staged, dst_dir_fd=target)
        os.fsync(target)


# -- small helpers ----------------------------------------------------------------------------------------
@contextmanager
def _opened(name: str, dir_fd: int, path: str | None = None) -> Iterator[int]:
    """A folder opened relative to another's descriptor, no link followed; closed on exit. With path, it is
    the source's, and an error names it."""
    if path is None:
        fd = os.open(name, _DIR, dir_fd=dir_fd)
    else:
        fd = _reading(path, os.open, name, _DIR, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(fd: int, path: str) -> list[str]:
    """A source folder's names, sorted; a name no kernel should give (holding `/`) is refused."""
    names = sorted(_reading(path or "/", os.listdir, fd))
    for name in names:
        if "/" in name or name in (".", ".."):
            raise RpfsError(f"cannot read {shown(path or '/')} in the point: it holds the name {shown(name)},"
                            " which no filesystem may hold (the point's filesystem is damaged)")
    return names


def _reading(path: str, call, *args, **kwargs):
    """call(...) on the source; an error is one line naming the path (EIO: the point is damaged there)."""
    try:
        return call(*args, **kwargs)
    except OSError as e:
        raise _read_error(path, e) from None


def _read_error(path: str, e: OSError) -> RpfsError:
    code = EXIT_CORRUPT if e.errno == errno.EIO else 1
    return RpfsError(f"cannot read {shown(path)} in the point: {e.strerror}", exit_code=code)


def _too_deep(path: str) -> RpfsError:
    return RpfsError(f"cannot restore {shown(path)}: folders nested more than {MAX_DEPTH} deep; restore a folder"
                     " further down")


def _json(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()
