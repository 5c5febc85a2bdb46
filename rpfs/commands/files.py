"""Commands about the files inside the disks: catalog, find, ls, diff, restore-files.

Names and link targets come from the guest: printed escaped (host/untrusted.shown), exact in --json
(undecodable bytes as the surrogate escapes Python's os.fsdecode gives: os.fsencode turns them back).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rpfs.catalog.query import FS_PATH, Listings, Uncataloged, diff, find, ls, mode_string, resolve, split_fs_path
from rpfs.commands import open_source, open_store, print_json
from rpfs.commands.progress import ProgressBar, human_bytes
from rpfs.errors import EXIT_USAGE, CorruptBlockError, RpfsError
from rpfs.host.untrusted import shown
from rpfs.store.catalogs import CATALOGED, KINDS, Catalog, Entry

DEEP_TREES = 50_000   # folders within folders that find, ls and diff follow (they recurse; the catalog's walk does not)


def _deep_trees(command):
    """A guest may nest folders as deep as it likes: followed DEEP_TREES deep, then one line, no traceback."""
    def run(args) -> int:
        sys.setrecursionlimit(max(sys.getrecursionlimit(), DEEP_TREES + 1000))
        try:
            return command(args)
        except RecursionError:
            raise RpfsError(f"the catalog holds folders nested more than {DEEP_TREES} deep, deeper than rpfs"
                            " searches: name a folder further down (rpfs ls, or a longer path)") from None
    run.__doc__ = command.__doc__
    return run


def cmd_catalog(args) -> int:
    from rpfs.catalog.build import catalog_point
    with open_store(args) as store:
        vms = [args.vm] if args.vm else store.vms()
        todo = []
        for vm in vms:
            todo += [store.point(vm, args.recovery_point)] if args.recovery_point else store.points(vm)
        summaries, failed = [], {}
        with ProgressBar("catalog", quiet=args.json) as bar:
            for n, point in enumerate(todo):
                try:
                    if args.again or args.recovery_point or not _has_catalog(store, point):
                        summaries.append(catalog_point(store, point, reuse=not args.again))
                except RpfsError as e:   # one point's trouble (pruned meanwhile, damaged) does not stop the rest
                    failed[f"{point.vm}/{point.id}"] = e
                bar(n + 1, len(todo))
    if args.json:
        print_json([asdict(s) for s in summaries] + [{"recovery_point": k, "error": e.message} for k, e in failed.items()])
    else:
        if not summaries and not failed:
            print("every recovery point has a catalog (rpfs catalog VM ID --again makes one anew)")
        for s in summaries:
            print(catalog_line(s))
    for where, e in failed.items():
        print(f"rpfs: {where}: no catalog made: {e.message}", file=sys.stderr)
    return max((e.exit_code for e in failed.values()), default=0)   # 3 if a point was damaged


def _has_catalog(store, point) -> bool:
    """A point with a damaged catalog record has one to make anew."""
    try:
        return store.catalog(point.vm, point.id) is not None
    except CorruptBlockError:
        return False


def catalog_line(s) -> str:
    """One line per cataloged point: what it holds, and what could not be read."""
    cataloged = [fs for fs in s.filesystems if fs.status == CATALOGED]
    files = sum(fs.files for fs in cataloged)
    text = (f"catalog of {s.vm}/{s.point_id}: {files} files in {len(cataloged)} filesystem(s), "
            f"{human_bytes(s.new_listing_bytes)} of new listings, {s.seconds:.1f} s")
    if s.reused_disks:
        text += f" (unchanged, not read: {', '.join(s.reused_disks)})"
    for fs in s.filesystems:
        if fs.status != CATALOGED:
            text += f"\n  {fs.label}: not cataloged: {shown(fs.status)}"
    return text


@_deep_trees
def cmd_find(args) -> int:
    label = _label(args)
    with open_source(args) as source:
        vms = [args.vm] if args.vm else source.vms()
        points = []
        for vm in vms:
            ids = source.point_ids(vm)
            if not ids and args.vm:
                source.point(vm)   # an unknown VM: said in its one line
            points += [(vm, point_id) for point_id in ids]
        answer = find(source, args.pattern, points, label)
    if args.json:
        print_json({"pattern": args.pattern, "points_searched": answer.points_searched,
                    "found": [{"vm": f.vm, "filesystem": f.filesystem, "path": f.path,
                               "versions": [{**_entry_json(v.entry), "points": v.point_ids} for v in f.versions]}
                              for f in answer.found],
                    "uncataloged": [asdict(u) for u in answer.uncataloged]})
    else:
        for f in answer.found:
            total = sum(len(v.point_ids) for v in f.versions)
            print(f"{f.vm} {shown(f.filesystem, None)}:{shown(f.path, None)}: {len(f.versions)} version(s) in"
                  f" {total} point(s)")
            for n, v in enumerate(f.versions, 1):
                ids = v.point_ids
                span = ", ".join(ids) if len(ids) <= 3 else \
                    f"{len(ids)} points: {ids[0]} first, {ids[-1]} last (--json lists each)"
                print(f"  v{n}  {_entry_line(v.entry, name=False)}  in {span}")
        if answer.found:   # else the error below says it
            _say_uncataloged(answer.uncataloged)
    if not answer.found:
        where = f"{len(points)} recovery point(s)" + (f" of {args.vm}" if args.vm else "")
        raise RpfsError(f"nothing matches {shown(args.pattern)!s} in {where}" + _uncataloged_note(answer.uncataloged))
    return 0


@_deep_trees
def cmd_ls(args) -> int:
    point_id, path = _point_and_paths(args.args, at_most=1)
    with open_source(args) as source:
        point = source.point(args.vm, point_id)
        catalog = _catalog_of(source, point.vm, point.id)
        target = _with_label(args, path[0] if path else None)
        if target is not None:
            shown_, skipped = ls(source, catalog, target)
    if target is None:
        if args.json:
            print_json({"vm": point.vm, "recovery_point": point.id,
                        "filesystems": [asdict(fs) for fs in catalog.filesystems]})
            return 0
        for fs in catalog.filesystems:
            what = f"{fs.files} files, {fs.folders} folders, {human_bytes(fs.bytes)}" if fs.status == CATALOGED \
                else f"not cataloged: {shown(fs.status)}"
            print(f"{fs.label}:  {fs.fstype or '-'}  {what}")
        return 0
    if args.json:
        print_json({"vm": point.vm, "recovery_point": point.id,
                    "folders": [{"filesystem": f.filesystem, "path": f.path,
                                 "entries": [_entry_json(e) for e in f.entries]} for f in shown_],
                    "uncataloged": [asdict(u) for u in skipped]})
        return 0
    for folder in shown_:
        if len(shown_) > 1:
            print(f"{folder.filesystem}:{shown(folder.path, None)}")
        for entry in folder.entries:
            print(_entry_line(entry))
    _say_uncataloged(skipped)
    return 0


@_deep_trees
def cmd_diff(args) -> int:
    with open_source(args) as source:
        old_point, new_point = source.point(args.vm, args.old), source.point(args.vm, args.new)
        old, new = _catalog_of(source, args.vm, old_point.id), _catalog_of(source, args.vm, new_point.id)
        changes = diff(source, old, new, _with_label(args, args.path))
    if args.json:
        print_json({"vm": args.vm, "old": old.point_id, "new": new.point_id,
                    "changes": [{"change": c.kind, "filesystem": c.filesystem, "path": c.path,
                                 "before": _entry_json(c.before) if c.before else None,
                                 "after": _entry_json(c.after) if c.after else None} for c in changes]})
        return 0
    for c in changes:
        entry = c.after or c.before
        slash = "/" if entry.kind == "d" and c.path != "/" else ""
        print(f"{c.kind} {c.filesystem}:{shown(c.path, None)}{slash}")
    if not changes:
        print(f"no change between {old.point_id} and {new.point_id}")
    return 0


def cmd_restore_files(args) -> int:
    from rpfs.attach.for_command import point_attached
    from rpfs.catalog.restore_files import RestoreOptions, restore_files
    point_id, given = _point_and_paths(args.args, at_most=None)
    if not given:
        raise RpfsError("name the files or folders to restore (e.g. /etc/nginx/nginx.conf)", EXIT_USAGE)
    with open_source(args) as source:
        point = source.point(args.vm, point_id)
        label, paths = _one_filesystem(source, point, [_with_label(args, p) for p in given])
        with point_attached(source, point) as attached:
            label, fs = _mounted(point, attached, label)
            options = RestoreOptions(force=args.force, devices=args.devices, setuid=args.setuid)
            with ProgressBar(f"restore-files {point.vm}", quiet=args.json) as bar:
                summary = restore_files(Path(fs.mountpoint), paths, Path(args.to), options, progress=bar)
    if args.json:
        print_json({"vm": point.vm, "recovery_point": point.id, "filesystem": label, "to": args.to, **asdict(summary)})
        return 0
    print(f"restored {summary.files} file(s), {summary.folders} folder(s), {summary.links} link(s) of"
          f" {point.vm}/{point.id} {label} to {args.to}: {human_bytes(summary.bytes)} in {summary.seconds:.1f} s")
    for skipped in summary.skipped:
        print(f"  skipped {shown(skipped.path)}: {skipped.why}")
    for path in summary.cleared:
        print(f"  set-id bits cleared: {shown(path)} (--setuid keeps them)")
    return 0


# -- helpers ----------------------------------------------------------------------------------------------
def _label(args) -> str | None:
    if args.partition is not None and not args.disk:
        raise RpfsError("--partition goes with --disk NAME", EXIT_USAGE)
    if not args.disk:
        return None
    return f"{args.disk}/p{args.partition}" if args.partition is not None else args.disk


def _with_label(args, path: str | None) -> str | None:
    """A path named with --disk/--partition as disk/p1:/path."""
    label = _label(args)
    if label is None:
        return path
    if path is None:
        return f"{label}:/"
    if FS_PATH.fullmatch(path):
        raise RpfsError(f"{shown(path)}: name the filesystem either in the path or with --disk, not both", EXIT_USAGE)
    return f"{label}:{path}"


def _point_and_paths(words: list[str], at_most: int | None) -> tuple[str | None, list[str]]:
    """[ID] PATH...: a first word that is not a path is the recovery point's id."""
    point_id = None
    if words and not words[0].startswith("/") and not FS_PATH.fullmatch(words[0]):
        point_id, words = words[0], words[1:]
    if at_most is not None and len(words) > at_most:
        raise RpfsError(f"too many paths: {' '.join(shown(w) for w in words)}", EXIT_USAGE)
    return point_id, words


def _catalog_of(source, vm: str, point_id: str) -> Catalog:
    catalog = source.catalog(vm, point_id)
    if catalog is None:
        raise RpfsError(f"recovery point {vm}/{point_id} has no catalog; make it with: rpfs catalog {vm} {point_id}")
    return catalog


def _one_filesystem(source, point, given: list[str]) -> tuple[str | None, list[str]]:
    """The filesystem the paths are on (disk/p1, a disk alone, or None: any) and the paths inside it. Without
    a label, the catalog (if any) says which filesystem holds each path."""
    catalog = source.catalog(point.vm, point.id)
    labels, paths = set(), []
    for text in given:
        label, path = split_fs_path(text)
        if label is None and catalog is not None:
            label = _holding(source, catalog, path)
        labels.add(label)
        paths.append(path)
    if len(labels) > 1:
        raise RpfsError(f"the paths are on several filesystems ({', '.join(sorted(map(str, labels)))}): restore"
                        " them one filesystem at a time")
    return labels.pop(), paths


def _mounted(point, attached: dict, label: str | None):
    """The attached filesystem a label names: disk/p1, or the only one mounted (of a disk, or at all)."""
    every = [(f"{disk}/{fs.name}", fs) for disk, found in attached.items() for fs in found]
    chosen = [(name, fs) for name, fs in every
              if label is None or name == label or name.split("/")[0] == label]
    if not chosen:
        raise RpfsError(f"{point.vm}/{point.id} has no filesystem {label} (it has: {', '.join(n for n, _ in every)})")
    mounted = [(name, fs) for name, fs in chosen if fs.mountpoint]
    if len(chosen) == 1 and not mounted:
        raise RpfsError(f"{point.vm}/{point.id} {chosen[0][0]}: cannot be read: {shown(chosen[0][1].status)}")
    if len(mounted) != 1:
        raise RpfsError(f"{point.vm}/{point.id} has {len(mounted)} filesystems that can be read"
                        f" ({', '.join(n for n, _ in mounted)}): name one (disk/p1:/path, or --disk NAME"
                        " --partition N)")
    return mounted[0]


def _holding(source, catalog: Catalog, path: str) -> str | None:
    """The one cataloged filesystem that has path (RpfsError if none or several do)."""
    listings = Listings(source)
    where = f"{catalog.vm}/{catalog.point_id}"
    having = [fs.label for fs in catalog.filesystems if fs.status == CATALOGED
              and resolve(listings, fs, path, where) is not None]
    if not having:
        raise RpfsError(f"{shown(path)} is not in the catalog of {where}" + _uncataloged_note(
            [Uncataloged(catalog.vm, catalog.point_id, fs.label, fs.status) for fs in catalog.filesystems
             if fs.status != CATALOGED]))
    if len(having) > 1:
        raise RpfsError(f"{shown(path)} is on several filesystems of {where} ({', '.join(having)}): name one, as"
                        f" {having[0]}:{shown(path)}")
    return having[0]


def _say_uncataloged(uncataloged: list[Uncataloged]) -> None:
    if uncataloged:
        print(f"rpfs: note:{_uncataloged_note(uncataloged)}", file=sys.stderr)


def _uncataloged_note(uncataloged: list[Uncataloged]) -> str:
    """What a search could not look into, in a few words (the JSON has each)."""
    if not uncataloged:
        return ""
    points = [u for u in uncataloged if not u.filesystem]
    filesystems = [u for u in uncataloged if u.filesystem]
    parts = []
    if points:
        parts.append(f"{len(points)} point(s) without a catalog (rpfs catalog makes them)")
    if filesystems:
        first = filesystems[0]
        parts.append(f"{len(filesystems)} filesystem(s) not cataloged (e.g. {first.vm}/{first.point_id}"
                     f" {first.filesystem}: {shown(first.why)})")
    return " (not searched: " + "; ".join(parts) + ")"


def _when(ns: int) -> str:
    try:
        return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"@{ns}ns"


def _entry_line(entry: Entry, name: bool = True) -> str:
    size = human_bytes(entry.size) if entry.kind == "f" else "-"
    text = f"{mode_string(entry)} {entry.uid}:{entry.gid} {size:>10} {_when(entry.mtime_ns)}"
    if name:
        text += f"  {shown(entry.name, None)}"
    if entry.kind == "l":
        text += f" -> {shown(entry.target, None)}"
    return text


def _entry_json(entry: Entry) -> dict:
    return {"name": entry.name, "kind": KINDS.get(entry.kind, entry.kind), "size": entry.size,
            "mode": f"{entry.mode:04o}", "uid": entry.uid, "gid": entry.gid, "mtime": _when(entry.mtime_ns),
            "mtime_ns": entry.mtime_ns, **({"target": entry.target} if entry.kind == "l" else {})}


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of catalog, find, ls, diff and restore-files; parents give every command --json and --key-file."""
    def filesystem_options(p) -> None:
        p.add_argument("--disk", help="only this disk's filesystems (or name it in the path: disk/p1:/etc)")
        p.add_argument("--partition", type=int, metavar="N", help="with --disk: only its partition N")

    p = sub.add_parser("catalog", parents=parents,
                       help="catalog the files inside recovery points' disks (backup does it for each new point)")
    p.add_argument("vm", nargs="?", help="only this VM's points (default: every VM)")
    p.add_argument("recovery_point", nargs="?", help="only this point (default: each point without a catalog)")
    p.add_argument("--again", action="store_true",
                   help="make catalogs anew, reading every disk (also points that have one)")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("find", parents=parents, help="find files by name or path in every recovery point's catalog")
    p.add_argument("pattern", help="a name ('nginx.conf'), or a path pattern ('/var/mail/alice/**'); * and ? stay"
                                   " within a name, ** crosses folders")
    p.add_argument("vm", nargs="?", help="only this VM (default: every VM)")
    filesystem_options(p)
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("ls", parents=parents, help="list a folder of a recovery point's filesystems (from its catalog)")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("args", nargs="*", metavar="[ID] [PATH]",
                   help="recovery point id (default: the latest) and a folder (disk/p1:/etc, or /etc); no path:"
                        " the point's filesystems")
    filesystem_options(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("diff", parents=parents, help="files added, removed and changed between two recovery points")
    p.add_argument("vm", help="the VM whose recovery points they are")
    p.add_argument("old", help="the older recovery point's id")
    p.add_argument("new", help="the newer recovery point's id ('latest' for the latest)")
    p.add_argument("path", nargs="?", help="only below this folder (disk/p1:/etc, or /etc)")
    filesystem_options(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("restore-files", parents=parents,
                       help="copy files and folders out of a recovery point, with their metadata")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("args", nargs="+", metavar="[ID] PATH",
                   help="recovery point id (default: the latest), then the files and folders (/etc/nginx/nginx.conf,"
                        " or disk/p1:/etc/nginx), each restored under --to with its path")
    p.add_argument("--to", required=True, metavar="FOLDER", help="an empty or new folder (made 0700)")
    p.add_argument("--force", action="store_true", help="restore into a folder that is not empty, replacing what is"
                                                        " at the same paths")
    p.add_argument("--devices", action="store_true", help="restore device files too (skipped otherwise)")
    p.add_argument("--setuid", action="store_true", help="keep set-user-id and set-group-id bits (cleared otherwise)")
    filesystem_options(p)
    p.set_defaults(func=cmd_restore_files)
