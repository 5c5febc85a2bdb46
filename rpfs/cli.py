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
from .jobs import recorded
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
    options = BackupOptions(consistency=load_config(Path(args.consistency_config)) if args.consistency_config else None,
                            allow_live=args.allow_live, keep_snapshot_days=args.keep_snapshot_days)
    with _store(args) as store, recorded(store, "backup", args.vm) as job:
        with ProgressBar(f"backup {args.vm}", quiet=args.json) as bar:
            point, summary = backup(store, args.vm, disks, progress=bar, options=options)
        job.bytes_read, job.bytes_written, job.recovery_point = summary.bytes_read, summary.stored_bytes, point.id
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
    with _store(args) as store, recorded(store, "restore", args.vm) as job:
        point = store.point(args.vm, args.recovery_point)
        job.recovery_point = point.id
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
            job.bytes_written += summaries[-1].written_bytes
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
    from .jobs import list_jobs
    store_jobs = []
    if args.store:
        with _store(args, readonly=True) as store:
            store_jobs = list_jobs(store, running_only=args.running)
    found = instant.jobs()
    if args.running:
        found = [j for j in found if j.state == "copying"]
    if args.json:
        _print_json({"jobs": [asdict(j) for j in store_jobs], "instant_restores": [asdict(j) for j in found]})
        return 0
    if not store_jobs and not found:
        print("no jobs" + ("" if args.store else " (give --store to see backups, restores, prune, gc, verify)"))
    for j in store_jobs:
        moved = f"read {human_bytes(j.bytes_read)}, wrote {human_bytes(j.bytes_written)}"
        print(f"{j.id}  {j.kind:<8} {j.vm or '-':<12} {j.status:<10} {j.start} -> {j.end or '...'}  {moved}"
              f"{'  ' + j.recovery_point if j.recovery_point else ''}{'  error: ' + j.error if j.error else ''}")
    for j in found:
        percent = 100.0 * j.copied_blocks / j.blocks if j.blocks else 100.0
        print(f"instant-restore {j.vm}/{j.point_id}/{j.disk} -> {j.target}: {j.state} {percent:.1f}%"
              f" ({j.copied_blocks}/{j.blocks} blocks){'  image ' + j.image if j.state != 'stopped' else ''}")
    return 0


def cmd_gc(args) -> int:
    from .maintenance import gc
    with _store(args) as store, recorded(store, "gc") as job:
        result = gc(store)
        job.bytes_written = result.freed_bytes
    if args.json:
        _print_json(asdict(result))
    else:
        print(f"removed {result.removed_blocks} unreferenced block(s), {human_bytes(result.freed_bytes)}"
              " (LMDB reuses the space; rpfs compact shrinks the file)")
    return 0


def cmd_compact(args) -> int:
    from .maintenance import compact
    with _store(args) as store:
        before, after = compact(store)
    if args.json:
        _print_json({"before_bytes": before, "after_bytes": after})
    else:
        print(f"compacted {args.store}: {human_bytes(before)} -> {human_bytes(after)}")
    return 0


def cmd_verify(args) -> int:
    from .maintenance import verify
    with _store(args) as store, recorded(store, "verify", args.vm) as job:
        with ProgressBar("verify", quiet=args.json) as bar:
            result = verify(store, args.vm, args.recovery_point, args.sample, progress=bar)
        job.bytes_read = result.checked_bytes
        if result.damaged:
            job.error = f"{len(result.damaged)} damaged recovery point(s)"
    if args.json:
        _print_json(asdict(result))
    else:
        print(f"checked {result.checked_blocks} block(s), {human_bytes(result.checked_bytes)}"
              f"{f' ({args.sample:g}% sample)' if args.sample < 100 else ''}")
        for point, problems in result.damaged.items():
            print(f"DAMAGED {point}: {len(problems)} bad block reference(s); first: {problems[0]}")
    return 4 if result.damaged else 0


def cmd_usage(args) -> int:
    from .usage import usage
    with _store(args, readonly=True) as store:
        result = usage(store)
    if args.json:
        _print_json({**asdict(result), "deduplication_ratio": round(result.deduplication_ratio, 3),
                     "compression_ratio": round(result.compression_ratio, 3)})
        return 0
    print(f"{'VM':<16} {'points':>6} {'protected instance':>19} {'backup storage':>15} {'snapshots':>10}")
    for v in result.vms:
        print(f"{v.vm:<16} {v.recovery_points:>6} {human_bytes(v.protected_instance_bytes):>19}"
              f" {human_bytes(v.backup_storage_bytes):>15} {human_bytes(v.snapshot_bytes):>10}")
    print(f"store: {human_bytes(result.stored_bytes)} stored ({human_bytes(result.file_bytes)} file), "
          f"deduplication {result.deduplication_ratio:.2f}x, compression {result.compression_ratio:.2f}x; "
          f"{result.unreferenced_blocks} unreferenced block(s) for gc. Shared blocks: {result.attribution}.")
    return 0


def cmd_pin(args) -> int:
    with _store(args) as store:
        found = store.point(args.vm, args.recovery_point)
        point = store.modify_point(found.vm, found.id, lambda p: setattr(p, "pinned", args.pinned))
    if args.json:
        _print_json({"vm": point.vm, "recovery_point": point.id, "pinned": point.pinned})
    else:
        print(f"{point.vm}/{point.id} {'pinned: prune keeps it' if point.pinned else 'unpinned'}")
    return 0


def _policy_from_args(args, base: dict | None) -> dict:
    """A policy dict from `rpfs policy create/update` flags, over base (update) or defaults (create)."""
    d = base or {"name": args.name, "schedule": {"kind": "daily", "at": "02:00"},
                 "retention": {"keep_last": 7}, "keep_snapshot_days": 0, "options": {}}
    kinds = [k for k in ("daily", "weekdays", "every_hours") if getattr(args, k) is not None]
    if len(kinds) > 1:
        raise RpfsError("give one schedule: --daily HH:MM, --weekdays mon,thu [--at HH:MM], or --every-hours N")
    if args.daily is not None:
        d["schedule"] = {"kind": "daily", "at": args.daily}
    elif args.weekdays is not None:
        d["schedule"] = {"kind": "weekly", "at": args.at or "02:00", "weekdays": args.weekdays.split(",")}
    elif args.every_hours is not None:
        d["schedule"] = {"kind": "hourly", "every_hours": args.every_hours}
    elif args.at is not None and d["schedule"]["kind"] != "hourly":
        d["schedule"]["at"] = args.at
    for key in ("keep_last", "daily", "weekly", "monthly", "yearly"):
        value = getattr(args, f"keep_{key}" if key != "keep_last" else "keep_last")
        if value is not None:
            d["retention"][key] = value
    if args.keep_snapshot_days is not None:
        d["keep_snapshot_days"] = args.keep_snapshot_days
    if args.consistency_config is not None:   # the timer runs in /, so keep it absolute
        d["consistency_config"] = str(Path(args.consistency_config).absolute()) if args.consistency_config else None
    if args.allow_live is not None:
        d["options"]["allow_live"] = args.allow_live == "yes"
    return d


def cmd_policy(args) -> int:
    from .policy import policy_from_dict, policy_from_toml, policy_to_dict
    from .protection import delete_policy, get_policy, save_policy
    with _store(args, readonly=args.action in ("list", "show")) as store:
        if args.action == "import":
            try:
                text = Path(args.file).read_text()
            except OSError as e:
                raise RpfsError(f"cannot read {args.file}: {e.strerror}") from None
            policy = policy_from_toml(text, args.file)
            save_policy(store, policy, replace=args.replace)
            shown = [policy]
        elif args.action == "create":
            policy = policy_from_dict(_policy_from_args(args, None))
            save_policy(store, policy)
            shown = [policy]
        elif args.action == "update":
            policy = policy_from_dict(_policy_from_args(args, policy_to_dict(get_policy(store, args.name))))
            save_policy(store, policy, replace=True)
            shown = [policy]
        elif args.action == "delete":
            delete_policy(store, args.name)
            shown = []
        elif args.action == "show":
            shown = [get_policy(store, args.name)]
        else:
            shown = [policy_from_dict(d) for d in store.records("policies").values()]
    if args.json:
        _print_json([policy_to_dict(p) for p in shown])
        return 0
    if args.action == "delete":
        print(f"deleted policy {args.name}")
    for p in shown:
        sch = p.schedule
        when = {"daily": f"daily at {sch.at}", "weekly": f"{','.join(sch.weekdays)} at {sch.at}",
                "hourly": f"every {sch.every_hours} h"}[sch.kind]
        keep = ", ".join(f"{k.removeprefix('keep_')} {v}" for k, v in asdict(p.retention).items() if v)
        print(f"{p.name}: {when} UTC; keep {keep}; snapshot kept {p.keep_snapshot_days:g} day(s)"
              f"{'; consistency ' + p.consistency_config if p.consistency_config else ''}")
    return 0


def cmd_protect(args) -> int:
    from .protection import protect
    with _store(args) as store:
        protection = protect(store, args.vm, args.policy, args.disk, args.temporary_disk)
    if args.json:
        _print_json(asdict(protection))
    else:
        print(f"{args.vm} protected by policy {args.policy}: disks {', '.join(protection.disks)}"
              f"{'; temporary (not backed up): ' + ', '.join(protection.temporary) if protection.temporary else ''}")
    return 0


def cmd_unprotect(args) -> int:
    from .protection import unprotect
    if args.keep_data == args.delete_data:
        raise RpfsError("say what happens to the recovery points: --keep-data or --delete-data")
    with _store(args) as store:
        deleted = unprotect(store, args.vm, delete_data=args.delete_data)
    if args.json:
        _print_json({"vm": args.vm, "deleted_recovery_points": deleted})
    else:
        print(f"{args.vm} is no longer protected; " + (f"{deleted} recovery point(s) deleted (rpfs gc frees the space)"
                                                        if args.delete_data else "its recovery points stay restorable"))
    return 0


def cmd_run(args) -> int:
    from .protection import run
    with _store(args) as store:
        result = run(store, stagger_seconds=args.stagger_seconds,
                     progress_for=lambda vm: ProgressBar(f"backup {vm}", quiet=args.json))
    if args.json:
        _print_json(asdict(result))
    else:
        print(f"backed up: {', '.join(result.backed_up) or 'none'}; not due: {len(result.not_due)}")
        for vm, ids in result.pruned.items():
            print(f"pruned {vm}: {', '.join(ids)}")
        for vm, error in result.failed.items():
            print(f"FAILED {vm}: {error}")
    return 1 if result.failed else 0


def cmd_prune(args) -> int:
    from .maintenance import prune
    from .protection import get_policy, protections
    with _store(args) as store:
        policies = {vm: get_policy(store, p.policy).retention for vm, p in protections(store).items()}
        if args.dry_run:
            results = prune(store, policies, args.vm, dry_run=True)
        else:
            with recorded(store, "prune", args.vm) as job:
                results = prune(store, policies, args.vm)
                job.bytes_written = sum(len(r.pruned) for r in results)
    if args.json:
        _print_json([asdict(r) for r in results])
        return 0
    for r in results:
        verb = "would prune" if args.dry_run else "pruned"
        print(f"{r.vm}: {verb} {len(r.pruned)}, keeps {len(r.kept)}")
        for point_id in r.pruned:
            print(f"  {verb}  {point_id}")
        if args.dry_run:
            for point_id, why in sorted(r.kept.items()):
                print(f"  keeps        {point_id}  ({why})")
    return 0


def cmd_schedule(args) -> int:
    import shlex
    import subprocess
    from .schedule import systemd_units
    if not args.store:
        raise RpfsError("no store given: use --store DIR or set RPFS_STORE")
    units = systemd_units(shlex.join([sys.executable, "-m", "rpfs"]), str(Path(args.store).absolute()), args.interval)
    if args.print or not args.install:
        for name, text in units.items():
            print(f"# {name}\n{text}")
        return 0
    folder = Path(args.unit_dir)
    for name, text in units.items():
        (folder / name).write_text(text)
    if args.unit_dir == "/etc/systemd/system":
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "rpfs.timer"]):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise RpfsError(f"wrote {', '.join(units)} to {folder}, but systemctl is not installed") from None
            if done.returncode != 0:
                raise RpfsError(f"wrote the units to {folder}, but {' '.join(cmd)} failed: {done.stderr.strip()}")
    print(f"installed {', '.join(units)} in {folder}")
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

    p = sub.add_parser("jobs", parents=[json_flag],
                       help="backups, restores, prune, gc and verify recorded in the store; instant restores")
    p.add_argument("--running", action="store_true", help="only jobs still running")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("policy", parents=[json_flag], help="protection policies: schedule, retention, snapshots")
    p.add_argument("action", choices=["create", "update", "import", "list", "show", "delete"])
    p.add_argument("name", nargs="?", help="policy name (for import: the TOML file)")
    p.add_argument("--daily", metavar="HH:MM")
    p.add_argument("--weekdays", metavar="mon,thu")
    p.add_argument("--at", metavar="HH:MM")
    p.add_argument("--every-hours", type=int, metavar="N")
    p.add_argument("--keep-last", type=int)
    for period in ("daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{period}", type=int, metavar="N")
    p.add_argument("--keep-snapshot-days", type=float)
    p.add_argument("--consistency-config", metavar="TOML")
    p.add_argument("--allow-live", choices=["yes", "no"])
    p.add_argument("--replace", action="store_true", help="import over an existing policy")
    p.set_defaults(func=_policy_dispatch)

    p = sub.add_parser("protect", parents=[json_flag], help="protect a VM with a policy")
    p.add_argument("vm")
    p.add_argument("--policy", required=True)
    p.add_argument("--disk", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--temporary-disk", action="append", default=[], metavar="NAME=PATH",
                   help="a disk that is never backed up nor counted (like a VM's temporary disk)")
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("unprotect", parents=[json_flag], help="stop protecting a VM")
    p.add_argument("vm")
    p.add_argument("--keep-data", action="store_true", help="its recovery points stay restorable")
    p.add_argument("--delete-data", action="store_true", help="delete its recovery points")
    p.set_defaults(func=cmd_unprotect)

    p = sub.add_parser("run", parents=[json_flag], help="every backup that is due, then prune (for a timer)")
    p.add_argument("--stagger-seconds", type=float, default=60.0,
                   help="spread the starts of VMs due at once over this many seconds (default 60)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", parents=[json_flag], help="delete recovery points the policies no longer keep")
    p.add_argument("vm", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="list what would be pruned and why the rest is kept")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("schedule", parents=[json_flag], help="systemd service and timer that run `rpfs run`")
    p.add_argument("--install", action="store_true", help="write and enable the units")
    p.add_argument("--print", action="store_true", help="print the units")
    p.add_argument("--interval", default="*:0/15", help="systemd OnCalendar of the checks (default every 15 min)")
    p.add_argument("--unit-dir", default="/etc/systemd/system", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("gc", parents=[json_flag], help="remove blocks no recovery point references")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("compact", parents=[json_flag], help="rewrite the store file compacted (no mounts may be open)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("verify", parents=[json_flag], help="read every referenced block and check its digest")
    p.add_argument("vm", nargs="?")
    p.add_argument("recovery_point", nargs="?")
    p.add_argument("--sample", type=float, default=100.0, metavar="PERCENT", help="check a random sample")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("usage", parents=[json_flag], help="protected instance size and backup storage per VM")
    p.set_defaults(func=cmd_usage)

    for name, pinned in (("pin", True), ("unpin", False)):
        p = sub.add_parser(name, parents=[json_flag],
                           help=f"{'protect a recovery point against' if pinned else 'allow again'} pruning")
        p.add_argument("vm")
        p.add_argument("recovery_point")
        p.set_defaults(func=cmd_pin, pinned=pinned)

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


def _policy_dispatch(args) -> int:
    if args.action in ("create", "update", "show", "delete", "import") and not args.name:
        raise RpfsError(f"rpfs policy {args.action} needs a {'TOML file' if args.action == 'import' else 'policy name'}")
    if args.action == "import":
        args.file = args.name
    return cmd_policy(args)


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
