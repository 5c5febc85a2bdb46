"""The `rpfs` command: argument parsing and one small function per subcommand.

User mistakes raise RpfsError and end as one line on stderr with a non-zero exit status; only bugs
print a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import lmdb

from .backup import BackupOptions, backup, parse_disk_specs
from .errors import RpfsError
from .progress import ProgressBar, human_bytes
from .blob import DEFAULT_ZSTD_LEVEL
from .store import DEFAULT_BLOCK_SIZE, FORMAT_VERSION, Store


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _store(args, readonly: bool = False) -> Store:
    return Store.open(args.store, readonly=readonly)


# -- subcommands -------------------------------------------------------------------------------------
def cmd_init(args) -> int:
    if not args.store:
        raise RpfsError("no store given: use --store DIR or set RPFS_STORE")
    block_size = _parse_size(args.block_size)
    with Store.init(Path(args.store), block_size, args.zstd_level) as store:
        if args.json:
            _print_json({"store": str(store.path), "block_size": store.block_size,
                         "zstd_level": store.zstd_level, "format_version": FORMAT_VERSION})
        else:
            print(f"initialised store {store.path} (block size {human_bytes(store.block_size)},"
                  f" zstd level {store.zstd_level})")
    return 0


def cmd_backup(args) -> int:
    from .quiesce import load_config
    disks = parse_disk_specs(args.disk)
    if args.keep_snapshot_days < 0:
        raise RpfsError("--keep-snapshot-days cannot be negative")
    options = BackupOptions(consistency=load_config(Path(args.consistency_config)) if args.consistency_config else None,
                            allow_live=args.allow_live, keep_snapshot_days=args.keep_snapshot_days)
    with _store(args) as store:
        with ProgressBar(f"backup {args.vm}", quiet=args.json) as bar:
            point, summary = backup(store, args.vm, disks, progress=bar, options=options)
    if args.json:
        _print_json({**asdict(summary), "mb_per_second": round(summary.mb_per_second, 1),
                     "recovery_point": asdict(point)})
        return 0
    s = summary
    print(f"recovery point {s.vm}/{s.point_id} ({point.consistency}): {s.disks} disk(s), {human_bytes(s.bytes_read)} read in "
          f"{s.seconds:.1f} s ({s.mb_per_second:.0f} MB/s)")
    print(f"  new {human_bytes(s.new_bytes)}, deduplicated {human_bytes(s.deduplicated_bytes)}, "
          f"zero {human_bytes(s.zero_bytes)}; stored {human_bytes(s.stored_bytes)} after compression")
    return 0


def cmd_list(args) -> int:
    with _store(args, readonly=True) as store:
        points = store.points(args.vm)
        if args.vm and not points:
            store.point(args.vm)  # raises: unknown VM
    if args.json:
        _print_json([{**asdict(p), "size": p.size, "stored_bytes": p.stored_bytes} for p in points])
        return 0
    if not points:
        print("no recovery points yet (rpfs backup VM --disk NAME=PATH)")
        return 0
    current_vm = None
    for p in points:
        if p.vm != current_vm:
            current_vm = p.vm
            print(f"{p.vm}")
        print(f"  {p.id}  {p.consistency:<12} size {human_bytes(p.size):>10}  stored {human_bytes(p.stored_bytes):>10}"
              f"  new {human_bytes(p.new_stored_bytes):>10}{_quiesce_note(p)}")
        for d in p.disks:
            print(f"      {d.name + '.img':<16} size {human_bytes(d.size):>10}  stored {human_bytes(d.stored_bytes):>10}"
                  f"  {d.blocks} blocks, {d.zero_blocks} holes")
    return 0


def _quiesce_note(point) -> str:
    """pre/post script results, freeze time and kept snapshot, as a short suffix for `list`."""
    q, notes = point.quiesce, []
    for phase in ("pre", "post"):
        if phase in q:
            notes.append(f"{phase} {'ok' if q[phase]['ok'] else 'failed: ' + q[phase]['message']}")
    if "freeze" in q:
        notes.append(f"frozen {q['freeze']['seconds']:.2f} s" + (" (watchdog thawed)" if q["freeze"]["watchdog_stepped_in"] else ""))
    if "read_live" in q:
        notes.append("read live: " + ", ".join(q["read_live"]))
    if point.snapshot:
        notes.append(f"snapshot kept until {point.snapshot['keep_until']}")
    return f"  ({'; '.join(notes)})" if notes else ""


def cmd_snapshots(args) -> int:
    from datetime import datetime, timezone
    with _store(args, readonly=True) as store:
        points = [p for p in store.points(args.vm) if p.snapshot]
    now = datetime.now(timezone.utc)
    found = [{"vm": p.vm, "recovery_point": p.id, "keep_until": p.snapshot["keep_until"],
              "expired": datetime.fromisoformat(p.snapshot["keep_until"]) < now,
              "disks": {d: {"path": path, "exists": Path(path).exists()} for d, path in p.snapshot["paths"].items()}}
             for p in points]
    if args.json:
        _print_json(found)
        return 0
    if not found:
        print("no kept snapshots (rpfs backup --keep-snapshot-days N keeps the newest)")
    for f in found:
        print(f"{f['vm']}/{f['recovery_point']}  kept until {f['keep_until']}{'  (expired)' if f['expired'] else ''}")
        for disk, info in f["disks"].items():
            print(f"    {disk}: {info['path']}{'' if info['exists'] else '  (missing)'}")
    return 0


def cmd_restore(args) -> int:
    from .restore import check_target, restore_disk
    with _store(args, readonly=True) as store:
        point = store.point(args.vm, args.recovery_point)
        if args.disk:
            jobs = [(point.disk(args.disk).name, Path(args.to))]
        else:
            folder = Path(args.to)
            if folder.exists() and not folder.is_dir():
                raise RpfsError(f"{folder} is not a folder (to restore one disk to a file, add --disk NAME)")
            jobs = [(d.name, folder / f"{d.name}.img") for d in point.disks]
            for name, target in jobs:   # refuse before writing anything
                folder.mkdir(parents=True, exist_ok=True)
                check_target(target, point.disk(name).size, args.force)
        summaries = []
        for name, target in jobs:
            with ProgressBar(f"restore {name}", quiet=args.json) as bar:
                summaries.append(restore_disk(store, point, name, target, force=args.force,
                                              discard=args.discard, progress=bar))
    if args.json:
        _print_json({"vm": point.vm, "recovery_point": point.id,
                     "disks": [{**asdict(s), "mb_per_second": round(s.mb_per_second, 1)} for s in summaries]})
        return 0
    for s in summaries:
        print(f"restored {s.vm}/{s.point_id}/{s.disk} to {s.target}: {human_bytes(s.size)} in {s.seconds:.1f} s"
              f" ({s.mb_per_second:.0f} MB/s; {human_bytes(s.written_bytes)} data, {human_bytes(s.hole_bytes)} holes)")
    return 0


def cmd_instant_restore(args) -> int:
    from . import instant
    with _store(args, readonly=True) as store:
        point = store.point(args.vm, args.recovery_point)
        job = instant.start(store, point, args.disk, Path(args.to))
    if not args.json:
        print(job.image)
        print(f"writable image of {job.vm}/{job.point_id}/{job.disk} ready; copying into {job.target} in the"
              f" background ({job.copied_blocks}/{job.blocks} blocks so far). Attach it read-write, e.g."
              f" losetup --find --show {job.image}", file=sys.stderr)
    if args.wait:
        with ProgressBar(f"copy {job.disk}", quiet=args.json) as bar:
            job = instant.wait(Path(job.target), progress=bar)
    if args.json:
        _print_json(asdict(job))
    elif args.wait:
        print(f"copy complete: {job.target} is a standalone image", file=sys.stderr)
    return 0


def cmd_instant_daemon(args) -> int:
    from . import instant, mount
    target = Path(args.target)
    mount.serve(lambda: instant.instant_filesystem(target), Path(args.mountpoint), ready_fd=args.ready_fd,
                log_file=Path(args.log_file) if args.log_file else None)
    return 0


def cmd_instant_wait(args) -> int:
    from . import instant
    with ProgressBar("copy", quiet=args.json) as bar:
        job = instant.wait(Path(args.target), progress=bar)
    if args.json:
        _print_json(asdict(job))
    else:
        print(f"copy complete: {job.target} is a standalone image (stop serving it: rpfs instant-stop {job.target})")
    return 0


def cmd_instant_stop(args) -> int:
    from . import instant
    job = instant.stop(Path(args.target))
    if args.json:
        _print_json(asdict(job))
    elif job.state == "complete":
        print(f"stopped; {job.target} is a standalone image")
    else:
        print(f"stopped at {job.copied_blocks}/{job.blocks} blocks; resume with: rpfs instant-restore {job.vm}"
              f" {job.point_id} --disk {job.disk} --to {job.target}")
    return 0


def cmd_jobs(args) -> int:
    from . import instant
    found = instant.jobs()
    if args.json:
        _print_json([asdict(j) for j in found])
        return 0
    if not found:
        print("no instant restores")
    for j in found:
        percent = 100.0 * j.copied_blocks / j.blocks if j.blocks else 100.0
        print(f"instant-restore {j.vm}/{j.point_id}/{j.disk} -> {j.target}: {j.state} {percent:.1f}%"
              f" ({j.copied_blocks}/{j.blocks} blocks){'  image ' + j.image if j.state != 'stopped' else ''}")
    return 0


def cmd_mount(args) -> int:
    from . import mount
    cache_bytes = args.cache_mb << 20
    if args.foreground:
        mountpoint = mount.check_mountpoint(Path(args.mountpoint))
        ready_fd = args.ready_fd
        mount.serve(lambda: mount.store_filesystem(Path(args.store or ""), cache_bytes), mountpoint,
                    ready_fd=ready_fd, debug=args.debug, log_file=Path(args.log_file) if args.log_file else None)
        return 0
    pid = mount.start_store_daemon(Path(args.store or ""), Path(args.mountpoint), cache_bytes)
    if args.json:
        _print_json({"mountpoint": str(Path(args.mountpoint).resolve()), "pid": pid})
    else:
        print(f"mounted {args.store} at {args.mountpoint} (daemon pid {pid}); unmount with: rpfs umount {args.mountpoint}")
    return 0


def cmd_umount(args) -> int:
    from . import mount
    mount.unmount(Path(args.mountpoint))
    if args.json:
        _print_json({"unmounted": str(Path(args.mountpoint).absolute())})
    else:
        print(f"unmounted {args.mountpoint}")
    return 0


def cmd_attach(args) -> int:
    """An image file or device, or VM[/ID] of the store (every disk of that recovery point)."""
    from . import attach as attach_mod
    source = Path(args.source)
    if source.exists() or not args.store:
        found = {"": attach_mod.attach(source, Path(args.dest))}
    else:
        from .vm_attach import attach_point
        vm, _, point_id = args.source.partition("/")
        with _store(args, readonly=True) as store:
            point = store.point(vm, point_id or None)
        found = attach_point(store.path, point, Path(args.dest))
    if args.json:
        if "" in found:
            _print_json([asdict(f) for f in found[""]])
        else:
            _print_json({"vm": point.vm, "recovery_point": point.id, "dest": str(Path(args.dest).absolute()),
                         "disks": [{"disk": d, "filesystems": [asdict(f) for f in fs]} for d, fs in found.items()]})
        return 0
    for disk, filesystems in found.items():
        for f in filesystems:
            where = f.mountpoint if f.status == "mounted" else f.status
            print(f"{disk + ' ' if disk else ''}{f.name:<6} {f.fstype or '-':<10} {human_bytes(f.size):>10}  {where}")
    return 0


def cmd_detach(args) -> int:
    from .vm_attach import detach_point_or_image
    undone = detach_point_or_image(Path(args.dest))
    if args.json:
        _print_json({"unmounted": [str(u) for u in undone]})
    else:
        print(f"detached {len(undone)} filesystem(s) from {args.dest}")
    return 0


# -- parsing -----------------------------------------------------------------------------------------
def _parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = t[-1:] if t[-1:].isalpha() else ""
    try:
        return int(t[:len(t) - len(suffix)]) * units[suffix]
    except (ValueError, KeyError):
        raise RpfsError(f"cannot read size {text!r} (examples: 1M, 256K, 1048576)") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"rpfs: {message} (see rpfs --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rpfs", description="Recovery-point filesystem: back up disk images, mount and restore them.")
    parser.add_argument("--store", default=os.environ.get("RPFS_STORE"),
                        help="store directory (default: $RPFS_STORE)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser("init", parents=[json_flag], help="create a store")
    p.add_argument("--block-size", default=str(DEFAULT_BLOCK_SIZE), help="block size (default 1M)")
    p.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL,
                   help=f"compression level for new blocks, 1-19 (default {DEFAULT_ZSTD_LEVEL}: fastest)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("backup", parents=[json_flag], help="back up the disks of a VM into a new recovery point")
    p.add_argument("vm")
    p.add_argument("--disk", action="append", default=[], metavar="NAME=PATH",
                   help="a disk of the VM: an image file or a block device (repeat for each disk)")
    p.add_argument("--consistency-config", metavar="TOML",
                   help="pre/post scripts and filesystems to freeze for the snapshot (see README)")
    p.add_argument("--allow-live", action="store_true",
                   help="back up a disk in use that cannot be snapshotted (recorded as inconsistent)")
    p.add_argument("--keep-snapshot-days", type=float, default=0.0, metavar="DAYS",
                   help="keep the newest reflink snapshot this many days (default 0: delete it after the backup)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", parents=[json_flag], help="list VMs, recovery points and disks")
    p.add_argument("vm", nargs="?")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("snapshots", parents=[json_flag], help="kept reflink snapshots (the instant-restore tier)")
    p.add_argument("vm", nargs="?")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("restore", parents=[json_flag], help="write a recovery point's disks back (full restore)")
    p.add_argument("vm")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="folder for DISK.img files; with --disk, the file or block device to write")
    p.add_argument("--disk", help="restore only this disk")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--discard", action="store_true", help="discard holes on a block device instead of writing zeros")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("instant-restore", parents=[json_flag],
                       help="a writable disk image at once, copied out of the store in the background")
    p.add_argument("vm")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest)")
    p.add_argument("--disk", required=True, help="the disk to restore")
    p.add_argument("--to", required=True, metavar="PATH", help="the image file the copy ends up in")
    p.add_argument("--wait", action="store_true", help="return only when the copy is complete")
    p.set_defaults(func=cmd_instant_restore)

    p = sub.add_parser("instant-wait", parents=[json_flag], help="wait until an instant restore's copy is complete")
    p.add_argument("target")
    p.set_defaults(func=cmd_instant_wait)

    p = sub.add_parser("instant-stop", parents=[json_flag],
                       help="stop serving an instant restore's image (an unfinished copy stays resumable)")
    p.add_argument("target")
    p.set_defaults(func=cmd_instant_stop)

    p = sub.add_parser("jobs", parents=[json_flag], help="instant restores and their copy progress")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("instant-daemon")   # started by instant-restore; not for users
    p.add_argument("target")
    p.add_argument("mountpoint")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log-file")
    p.set_defaults(func=cmd_instant_daemon)

    p = sub.add_parser("mount", parents=[json_flag], help="mount the store read-only (FUSE)")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--cache-mb", type=int, default=256, help="decoded-block cache size in MiB (default 256)")
    p.add_argument("--debug", action="store_true", help="log every error in detail")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", parents=[json_flag], help="unmount a store mount (also one whose daemon died)")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("attach", parents=[json_flag],
                       help="mount every filesystem of a disk image, or of every disk of VM[/ID], read-only")
    p.add_argument("source", metavar="IMAGE|VM[/ID]",
                   help="an image file or block device; or a VM of the store, optionally /ID (default: latest)")
    p.add_argument("dest")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("detach", parents=[json_flag], help="undo rpfs attach")
    p.add_argument("dest")
    p.set_defaults(func=cmd_detach)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RpfsError as e:
        print(f"rpfs: {e.message}", file=sys.stderr)
        return e.exit_code
    except (OSError, lmdb.Error) as e:  # the system said no (permissions, a read-only disk...): one line
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"rpfs: {getattr(e, 'strerror', None) or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rpfs: interrupted; {'no recovery point was created' if args.command == 'backup' else 'stopped'}",
              file=sys.stderr)
        return 130
