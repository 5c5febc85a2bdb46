"""Questions to catalogs: find a name across points, list a folder, diff two points. No disk is read.

Every listing is read through one cache per command (`Listings`), so a folder shared by many points is
decoded once, and a search remembers what it found below each (listing, path) it has searched: across
100 points of a filesystem whose folders mostly did not change, it reads each distinct folder once.
A point without a catalog, or a filesystem that could not be read, is reported as such beside the answer;
a damaged listing raises CorruptBlockError naming its point (never a shorter answer).
"""
from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field

from rpfs.errors import RpfsError
from rpfs.host.untrusted import shown as shown_path
from rpfs.store.catalogs import CATALOGED, Catalog, CatalogedFilesystem, CatalogReader, Entry, entry_of, \
    listing_rows

FS_PATH = re.compile(r"(?P<fs>[^:/]+(?:/[^:/]+)?):(?P<path>/.*)", re.S)   # disk/p1:/etc, or disk:/etc


class Listings:
    """Listings read once per command, by id: as entries by name, or as rows (find)."""

    def __init__(self, reader: CatalogReader):
        self.reader = reader
        self._cache: dict[bytes, dict[str, Entry]] = {}
        self._rows: dict[bytes, list[list]] = {}

    def entries(self, listing_id: bytes, where: str) -> dict[str, Entry]:
        found = self._cache.get(listing_id)
        if found is None:
            found = self._cache[listing_id] = {e.name: e for e in self.reader.listing(listing_id, where)}
        return found

    def rows(self, listing_id: bytes, where: str) -> list[list]:
        found = self._rows.get(listing_id)
        if found is None:
            raw = self.reader.listing_bytes(listing_id, where)
            found = self._rows[listing_id] = listing_rows(raw, f"a listing of {where}")
        return found


@dataclass
class Uncataloged:
    """A point, or one filesystem of it, that a question could not look into."""
    vm: str
    point_id: str
    filesystem: str     # disk/p1, or "" for the whole point
    why: str


# -- paths ------------------------------------------------------------------------------------------
def split_fs_path(text: str) -> tuple[str | None, str]:
    """'vda/p1:/etc/x' -> ('vda/p1', '/etc/x'); '/etc/x' -> (None, '/etc/x')."""
    match = FS_PATH.fullmatch(text)
    if match:
        return match["fs"], _normal(match["path"], text)
    if not text.startswith("/"):
        raise RpfsError(f"{text!r}: give an absolute path inside the disk (/etc/hosts), or disk/p1:/etc/hosts")
    return None, _normal(text, text)


def _normal(path: str, given: str) -> str:
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise RpfsError(f"{given!r}: a path with '..' is not accepted; name the file by its own path")
    return "/" + "/".join(parts)


def choose_filesystems(catalog: Catalog, label: str | None) -> list[CatalogedFilesystem]:
    """The filesystems a label names: disk/p1 exactly, a disk's, or (None) all of them."""
    if label is None:
        return list(catalog.filesystems)
    chosen = [fs for fs in catalog.filesystems if fs.label == label or fs.disk == label]
    if not chosen:
        known = ", ".join(fs.label for fs in catalog.filesystems) or "none"
        raise RpfsError(f"{catalog.vm}/{catalog.point_id} has no filesystem {label} (it has: {known})")
    return chosen


def resolve(listings: Listings, fs: CatalogedFilesystem, path: str, where: str) -> Entry | None:
    """The entry at path in a cataloged filesystem (a folder entry named "/" for the root); None if absent.
    A link on the way is not followed: RpfsError naming it."""
    entry = Entry("/", "d", 0, 0, 0, 0, 0, folder=bytes.fromhex(fs.root))
    walked = ""
    for name in [p for p in path.split("/") if p]:
        if entry.kind == "l":
            raise RpfsError(f"{fs.label}:{shown_path(walked)} is a link (to {shown_path(entry.target)}) in {where}:"
                            " name the path it points to")
        if entry.kind != "d":
            return None
        entry = listings.entries(entry.folder, where).get(name)
        walked += "/" + name
        if entry is None:
            return None
    return entry


# -- find ---------------------------------------------------------------------------------------------
def compile_pattern(pattern: str) -> tuple[re.Pattern, str]:
    """A glob as restic's and borg's: without '/', it matches a name anywhere; starting with '/', the whole
    path; else the end of a path. '*' and '?' stay within a name, '**' crosses folders. Also returns the
    literal start of an anchored pattern (folders off it are not searched)."""
    body = _regex_of_glob(pattern)
    if pattern.startswith("/"):
        literal = re.split(r"[*?]", pattern, maxsplit=1)[0]
        return re.compile(body, re.S), literal
    return re.compile(r"(?:.*/)?" + body, re.S), ""   # a name, or the end of a path, at a folder's edge


def compile_name_pattern(pattern: str) -> re.Pattern | None:
    """For a pattern of one name (no '/', no '**'): a regex of the name alone, which matches exactly where
    compile_pattern's matches the path ending in that name; find then builds no path for a file that does
    not match. None for any other pattern."""
    return None if "/" in pattern or "**" in pattern else re.compile(_regex_of_glob(pattern), re.S)


def _regex_of_glob(pattern: str) -> str:
    if not pattern or "\0" in pattern:
        raise RpfsError("give a name or a pattern to find (e.g. 'nginx.conf', '/var/mail/alice/**')")
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass
class Version:
    """One state of a path, and the points that have it (oldest first)."""
    entry: Entry
    point_ids: list[str] = field(default_factory=list)


@dataclass
class Found:
    vm: str
    filesystem: str     # disk/p1
    path: str
    versions: list[Version] = field(default_factory=list)


@dataclass
class FindAnswer:
    found: list[Found]
    uncataloged: list[Uncataloged]
    points_searched: int


def find(reader: CatalogReader, pattern: str, points: list[tuple[str, str]], label: str | None = None) -> FindAnswer:
    """Every path matching pattern in the given points (vm, id; oldest first per VM), grouped into versions."""
    regex, literal = compile_pattern(pattern)
    by_name = compile_name_pattern(pattern)
    listings = Listings(reader)
    below: dict[tuple[bytes, str], list[tuple[str, Entry]]] = {}
    by_path: dict[tuple[str, str, str], Found] = {}
    uncataloged: list[Uncataloged] = []
    searched = 0

    def search(listing_id: bytes, folder: str, where: str) -> list[tuple[str, Entry]]:
        known = below.get((listing_id, folder))
        if known is not None:
            return known
        matches: list[tuple[str, Entry]] = []
        what = f"a listing of {where}"
        for row in listings.rows(listing_id, where):   # an Entry only of a match or a folder entered
            is_folder = row[1] == "d"
            if by_name is not None:
                hit = by_name.fullmatch(row[0])
                if not hit and not is_folder:
                    continue   # no path built for most rows
            path = f"{folder}/{row[0]}"
            if by_name is None:
                hit = regex.fullmatch(path)
            entering = is_folder and _may_hold(path, literal)
            if hit or entering:
                entry = entry_of(row, what)
                if hit:
                    matches.append((path, entry))
                if entering:
                    matches.extend(search(entry.folder, path, where))
        below[listing_id, folder] = matches
        return matches

    for vm, point_id in points:
        catalog = reader.catalog(vm, point_id)
        if catalog is None:
            uncataloged.append(Uncataloged(vm, point_id, "", "no catalog (rpfs catalog makes one)"))
            continue
        searched += 1
        where = f"{vm}/{point_id}"
        chosen = [fs for fs in catalog.filesystems if label is None or label in (fs.label, fs.disk)]
        if not chosen:
            uncataloged.append(Uncataloged(vm, point_id, label or "", "no such filesystem in this point"))
        for fs in chosen:
            if fs.status != CATALOGED:
                uncataloged.append(Uncataloged(vm, point_id, fs.label, fs.status))
                continue
            root, fs_label = bytes.fromhex(fs.root), fs.label
            hits = ([("/", Entry("/", "d", 0, 0, 0, 0, 0, folder=root))] if regex.fullmatch("/") else []) + \
                search(root, "", where)
            for path, entry in hits:
                found = by_path.get((vm, fs_label, path))
                if found is None:
                    found = by_path[vm, fs_label, path] = Found(vm, fs_label, path)
                _add_version(found, entry, point_id)
    return FindAnswer(sorted(by_path.values(), key=lambda f: (f.vm, f.filesystem, f.path)), uncataloged, searched)


def _may_hold(folder: str, literal: str) -> bool:
    """Can a path below folder match an anchored pattern starting with literal?"""
    return not literal or literal.startswith(folder + "/") or folder.startswith(literal.rstrip("/")) \
        or (folder + "/").startswith(literal)


def _add_version(found: Found, entry: Entry, point_id: str) -> None:
    """Points with the same state of the path share a version (a folder: its own metadata, not its content).
    An entry of a folder listing shared by several points is the same object in each (Listings): no state to
    compare."""
    for version in found.versions:
        if version.entry is entry:
            version.point_ids.append(point_id)
            return
    state = _state(entry)
    for version in found.versions:
        if _state(version.entry) == state:
            version.point_ids.append(point_id)
            return
    found.versions.append(Version(entry, [point_id]))


def _state(entry: Entry) -> tuple:
    return (entry.kind, entry.size, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.target,
            b"" if entry.kind == "d" else entry.folder)


# -- ls -------------------------------------------------------------------------------------------------
@dataclass
class Folder:
    """What ls shows: a folder's entries (or one entry that is not a folder) of one filesystem."""
    filesystem: str
    path: str
    entries: list[Entry]


def ls(reader: CatalogReader, catalog: Catalog, target: str) -> tuple[list[Folder], list[Uncataloged]]:
    """A folder (or one entry) of a point's filesystems, and the filesystems that could not be looked into."""
    label, path = split_fs_path(target)
    where = f"{catalog.vm}/{catalog.point_id}"
    listings = Listings(reader)
    shown: list[Folder] = []
    skipped: list[Uncataloged] = []
    for fs in choose_filesystems(catalog, label):
        if fs.status != CATALOGED:
            skipped.append(Uncataloged(catalog.vm, catalog.point_id, fs.label, fs.status))
            continue
        entry = resolve(listings, fs, path, where)
        if entry is None:
            continue
        if entry.kind == "d":
            shown.append(Folder(fs.label, path, sorted(listings.entries(entry.folder, where).values(),
                                                       key=lambda e: e.name)))
        else:
            shown.append(Folder(fs.label, path, [entry]))
    if not shown:
        why = "".join(f"; {u.filesystem} not cataloged: {shown_path(u.why)}" for u in skipped)
        raise RpfsError(f"{shown_path(target)} is not in the catalog of {where}{why}")
    return shown, skipped


# -- diff -----------------------------------------------------------------------------------------------
@dataclass
class Change:
    kind: str           # "+" added, "-" removed, "M" changed (content or metadata), "T" changed kind
    filesystem: str
    path: str
    before: Entry | None
    after: Entry | None


def diff(reader: CatalogReader, old: Catalog, new: Catalog, target: str | None = None) -> list[Change]:
    """What changed from old to new (the same VM's points), below target if given. Folders whose listing is
    the same are not read at all."""
    listings = Listings(reader)
    label, path = split_fs_path(target) if target else (None, "/")
    changes: list[Change] = []
    olds = {fs.label: fs for fs in old.filesystems}
    news = {fs.label: fs for fs in new.filesystems}
    names = [name for name in sorted(set(olds) | set(news))
             if label is None or name == label or name.split("/")[0] == label]
    if not names:
        raise RpfsError(f"neither {old.point_id} nor {new.point_id} has a filesystem {label}")
    found = False
    for name in names:
        before, after = olds.get(name), news.get(name)
        for fs, which in ((before, old), (after, new)):
            if fs is not None and fs.status != CATALOGED:
                raise RpfsError(f"{fs.label} of {which.vm}/{which.point_id} is not cataloged: {shown_path(fs.status)}")
        a = resolve(listings, before, path, f"{old.vm}/{old.point_id}") if before else None
        b = resolve(listings, after, path, f"{new.vm}/{new.point_id}") if after else None
        found = found or a is not None or b is not None
        _diff_entries(listings, name, path, a, b, changes, (f"{old.vm}/{old.point_id}", f"{new.vm}/{new.point_id}"))
    if not found:
        raise RpfsError(f"{shown_path(target or '/')} is in neither {old.point_id} nor {new.point_id}")
    return changes


def _diff_entries(listings: Listings, fs: str, path: str, a: Entry | None, b: Entry | None,
                  changes: list[Change], where: tuple[str, str]) -> None:
    if a is None and b is None:
        return
    if a is None or b is None or (a.kind == "d") != (b.kind == "d"):
        if a is not None:
            _all_below(listings, fs, path, a, "-", changes, where[0])
        if b is not None:
            _all_below(listings, fs, path, b, "+", changes, where[1])
        return
    if a.kind != "d":
        if _state(a) != _state(b):
            changes.append(Change("T" if a.kind != b.kind else "M", fs, path, a, b))
        return
    if (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid) and path != "/":
        changes.append(Change("M", fs, path, a, b))
    if a.folder == b.folder:
        return
    old, new = listings.entries(a.folder, where[0]), listings.entries(b.folder, where[1])
    for name in sorted(set(old) | set(new)):
        _diff_entries(listings, fs, _join(path, name), old.get(name), new.get(name), changes, where)


def _all_below(listings: Listings, fs: str, path: str, entry: Entry, kind: str, changes: list[Change],
               where: str) -> None:
    changes.append(Change(kind, fs, path, entry if kind == "-" else None, entry if kind == "+" else None))
    if entry.kind == "d":
        for name, child in sorted(listings.entries(entry.folder, where).items()):
            _all_below(listings, fs, _join(path, name), child, kind, changes, where)


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def mode_string(entry: Entry) -> str:
    """-rw-r--r--, as ls -l shows it."""
    kinds = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "c": stat.S_IFCHR, "b": stat.S_IFBLK,
             "p": stat.S_IFIFO, "s": stat.S_IFSOCK}
    return stat.filemode(kinds.get(entry.kind, 0) | entry.mode)
