"""Cataloging a recovery point: walk each filesystem of its disks, read-only, into folder listings.

A disk whose block map is the same as in the VM's previous cataloged point (its map's pieces all equal) is
not attached again: its filesystems' records are that point's, and their listings are shared. Every other
disk is attached read-only (attach/for_command.py) and each filesystem the kernel mounts is walked with
lstat only, never following a link. A filesystem that cannot be mounted, or whose walk meets an error (a damaged
block reads as EIO), is recorded with why: a catalog never holds part of a filesystem as if it were whole.
The format: rpfs/store/catalogs.py, docs/design/catalog.md.
"""
from __future__ import annotations

import os
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from rpfs.attach.filesystems import MOUNTED
from rpfs.attach.for_command import clean_leftovers, point_attached
from rpfs.errors import RpfsError
from rpfs.store.catalogs import CATALOGED, ListingMissing, Catalog, CatalogedFilesystem, Entry, encode_listing
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.store import DatabaseError, Store

_KIND_OF_FORMAT = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
                   stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


SCAN_THREADS = 8      # folders listed at once by a walk (each lstat through a store mount waits for a block)
AHEAD = 64            # folders listed ahead of the walk at most

UNREADABLE = "could not be read"   # a walk's error (maybe damage)
PASSING = (UNREADABLE, "mount failed", "probe failed")   # statuses that may pass: such a disk is read again


@dataclass
class CatalogSummary:
    vm: str
    point_id: str
    filesystems: list[CatalogedFilesystem]
    reused_disks: list[str]          # unchanged since the previous cataloged point: not read
    new_listing_bytes: int           # listings new to the store (before compression)
    seconds: float


@dataclass
class _Walk:
    """The listings of one filesystem as they are made, by id."""
    listing_id: Callable[[bytes], bytes]
    listings: dict[bytes, bytes] = field(default_factory=dict)
    files: int = 0
    folders: int = 0
    bytes: int = 0

    def listing(self, entries: list[Entry]) -> bytes:
        raw = encode_listing(entries)
        listing_id = self.listing_id(raw)
        self.listings[listing_id] = raw
        return listing_id


def catalog_point(store: Store, point: RecoveryPoint, reuse: bool = True) -> CatalogSummary:
    """Catalog a point's filesystems and store the catalog (replacing one it had)."""
    try:
        return _catalog_point(store, point, reuse)
    except _ReusedGone:   # the previous point was pruned meanwhile, and its listings with it: read the disks
        return _catalog_point(store, point, reuse=False)


class _ReusedGone(Exception):
    pass


def _catalog_point(store: Store, point: RecoveryPoint, reuse: bool) -> CatalogSummary:
    began = time.monotonic()
    clean_leftovers()   # a killed command's attach is undone even when nothing here needs attaching
    previous = _previous_catalog(store, point) if reuse else None
    reused = _unchanged_disks(store, point, previous) if previous else []
    filesystems: list[CatalogedFilesystem] = [fs for fs in previous.filesystems if fs.disk in reused] if previous else []
    listings: dict[bytes, bytes] = {}
    to_walk = [d.name for d in point.disks if d.name not in reused]
    if to_walk:
        with store.keeper() as keeper:
            keeper.take(point.vm, point.id)   # prune waits for this point until it is cataloged
            with point_attached(store, point) as attached:
                for disk in to_walk:
                    for found in attached.get(disk, []):
                        fs, walked = _catalog_filesystem(store, disk, found)
                        filesystems.append(fs)
                        listings.update(walked)
    order = {d.name: n for n, d in enumerate(point.disks)}
    filesystems.sort(key=lambda fs: (order.get(fs.disk, len(order)), fs.partition or 0, fs.name))
    catalog = Catalog(point.vm, point.id, datetime.now(timezone.utc).isoformat(timespec="seconds"), filesystems)
    try:
        added = store.put_catalog(catalog, listings)
    except ListingMissing:
        if not reused:
            raise
        raise _ReusedGone() from None
    if added is None:
        raise RpfsError(f"recovery point {point.vm}/{point.id} was pruned while it was cataloged")
    return CatalogSummary(point.vm, point.id, filesystems, reused, added, time.monotonic() - began)


def catalog_new_point(store: Store, point: RecoveryPoint) -> tuple[CatalogSummary | None, str]:
    """The catalog a backup makes of its new point: its failure is a note, never the backup's (the point is
    whole without it; rpfs catalog makes it later). Returns the summary, or None and why."""
    try:
        return catalog_point(store, point), ""
    except RpfsError as e:
        return None, e.message
    except OSError as e:
        return None, f"{e.strerror or e}"
    except DatabaseError as e:   # a damaged page of the catalog tables: rpfs check says more
        return None, f"the store's catalog tables cannot be written: {e}"


def walk(root: str, listing_id: Callable[[bytes], bytes]) -> tuple[bytes, _Walk]:
    """The listings of the tree at root (a mounted filesystem), children before parents; returns the root's
    listing id. lstat only: no link is followed, and no folder entered is anything but a folder (the
    filesystem is mounted read-only, so what lstat saw stays). WalkError on any unreadable folder or entry.
    Folders are listed ahead of the walk by a few threads (_Scanner): read through a store mount, each
    lstat of a cold inode waits for a block to be fetched and decoded, and several waits overlap.
    Folders are opened relative to a folder above them (_Place), never by a path longer than REBASE bytes:
    a tree of any depth is walked (a guest's deep tree would otherwise stop at PATH_MAX)."""
    made = _Walk(listing_id)
    with _Scanner() as scanner:
        top = scanner.place(None, os.fsencode(root), b"")
        # A stack of folders being listed: (place, entries so far, (name, stat, link target) still to look
        # at, the folder's own name and stat for its parent's entry); deep trees need no recursion.
        stack = [(top, [], scanner.take(top), None)]
        while True:
            place, entries, pending, own = stack[-1]
            while pending:
                name, st, target = pending.pop()
                kind = _KIND_OF_FORMAT.get(stat.S_IFMT(st.st_mode), "?")
                if kind == "d":
                    child = scanner.place(place, name, place.inside + b"/" + name)
                    stack.append((child, [], scanner.take(child), (name, st)))
                    break
                entries.append(_entry(name, kind, st, target=os.fsdecode(target) if kind == "l" else ""))
                made.files += 1
                made.bytes += st.st_size if kind == "f" else 0
            else:
                listing = made.listing(entries)
                stack.pop()
                scanner.leave(place)
                if not stack:
                    return listing, made
                made.folders += 1
                name, st = own
                stack[-1][1].append(_entry(name, "d", st, folder=listing))


REBASE = 2048   # a folder is opened by a path of at most this many bytes (plus a name) from the folder it is under


class WalkError(Exception):
    """A folder or entry that could not be read, and where (its path inside the filesystem)."""

    def __init__(self, inside: bytes, error: OSError):
        super().__init__(f"{os.fsdecode(inside or b'/')}: {error.strerror or error}")
        self.inside, self.error = inside or b"/", error


@dataclass(eq=False)
class _Place:
    """A folder as the walk reaches it: a path relative to an open folder above it (its base), and its path
    inside the filesystem (for messages). A place that opened a base of its own closes it when left."""
    base: int | None      # a folder descriptor, or None: `rel` is absolute (the mountpoint)
    rel: bytes
    inside: bytes
    owns_base: bool = False


class _Scanner:
    """Lists folders on SCAN_THREADS threads ahead of a depth-first walk: taking a folder's listing starts
    those of its subfolders, in the order the walk enters them, while at most AHEAD wait to be taken (so
    memory stays bounded whatever the tree). Leaving waits for every thread and closes every descriptor:
    nothing reads the mount after."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="catalog-scan")
        self._ahead: dict[tuple[int, bytes], _Place] = {}   # by (id of the parent place, name): not yet reached
        self._listing: dict[_Place, Future] = {}              # places being listed ahead, not yet taken
        self._bases: set[int] = set()

    def __enter__(self) -> "_Scanner":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._bases:
            os.close(fd)
        self._bases.clear()

    def place(self, parent: _Place | None, name: bytes, inside: bytes) -> _Place:
        """Where a subfolder of parent is (the root: parent None, name its absolute path)."""
        if parent is None:
            return _Place(None, name, inside)
        found = self._ahead.pop((id(parent), name), None)
        if found is not None:
            return found
        rel = name if parent.rel == b"." else parent.rel + b"/" + name
        if len(rel) <= REBASE:
            return _Place(parent.base, rel, inside)
        try:   # too long a path: open the parent, and the folder is found from there
            fd = os.open(parent.rel, _FOLDER, dir_fd=parent.base)
        except OSError as e:
            raise WalkError(parent.inside, e) from None
        self._bases.add(fd)
        return _Place(fd, name, inside, owns_base=True)

    def leave(self, place: _Place) -> None:
        if place.owns_base and place.base in self._bases:
            self._bases.discard(place.base)
            os.close(place.base)

    def take(self, place: _Place) -> list[tuple[bytes, os.stat_result, bytes]]:
        """The folder's (name, lstat, link target) triples, sorted by name, last first (the walk pops them)."""
        ahead = self._listing.pop(place, None)
        found = ahead.result() if ahead is not None else _scan(place)
        for name, st, _target in reversed(found):   # the walk enters the last first
            if len(self._listing) >= AHEAD:
                break
            if stat.S_ISDIR(st.st_mode):
                child = self.place(place, name, place.inside + b"/" + name)
                self._ahead[id(place), name] = child
                self._listing[child] = self._pool.submit(_scan, child)
        return found


_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _scan(place: _Place) -> list[tuple[bytes, os.stat_result, bytes]]:
    try:
        fd = os.open(place.rel, _FOLDER, dir_fd=place.base)
    except OSError as e:
        raise WalkError(place.inside, e) from None
    try:
        found = []
        with os.scandir(fd) as entries:
            for e in entries:
                name = os.fsencode(e.name)
                try:
                    st = e.stat(follow_symlinks=False)
                    target = os.fsencode(os.readlink(name, dir_fd=fd)) if stat.S_ISLNK(st.st_mode) else b""
                except OSError as error:
                    raise WalkError(place.inside + b"/" + name, error) from None
                found.append((name, st, target))
        return sorted(found, key=lambda item: item[0], reverse=True)
    except OSError as e:
        raise WalkError(place.inside, e) from None
    finally:
        os.close(fd)


def _entry(name: bytes, kind: str, st: os.stat_result, target: str = "", folder: bytes = b"") -> Entry:
    return Entry(os.fsdecode(name), kind, st.st_size if kind != "d" else 0, stat.S_IMODE(st.st_mode), st.st_uid,
                 st.st_gid, st.st_mtime_ns, target, folder)


def _catalog_filesystem(store: Store, disk: str, found) -> tuple[CatalogedFilesystem, dict[bytes, bytes]]:
    fs = CatalogedFilesystem(disk, found.name, found.partition, found.fstype, found.status)
    if found.status != MOUNTED:
        return fs, {}
    try:
        root, made = walk(found.mountpoint, store.listing_id)
    except WalkError as e:
        fs.status = f"{UNREADABLE}: {e}"
        return fs, {}
    fs.status, fs.root = CATALOGED, root.hex()
    fs.files, fs.folders, fs.bytes = made.files, made.folders, made.bytes
    return fs, made.listings


def _previous_catalog(store: Store, point: RecoveryPoint) -> Catalog | None:
    """The catalog of the VM's newest point before this one that has one."""
    ids = store.point_ids(point.vm)
    for point_id in reversed(ids[:ids.index(point.id)] if point.id in ids else ids):
        found = store.catalog(point.vm, point_id)
        if found is not None:
            return found
    return None


def _unchanged_disks(store: Store, point: RecoveryPoint, previous: Catalog) -> list[str]:
    """Disks whose block maps equal those of the previous cataloged point, and that it cataloged."""
    cataloged = {fs.disk for fs in previous.filesystems} - {fs.disk for fs in previous.filesystems
                                                            if fs.status.startswith(PASSING)}
    same = []
    for disk in point.disks:
        if disk.name not in cataloged:
            continue
        try:
            then = store.map_index(store.map_key(point.vm, previous.point_id, disk.name))
        except RpfsError:
            continue
        if then == store.map_index(store.map_key(point.vm, point.id, disk.name)):
            same.append(disk.name)
    return same
