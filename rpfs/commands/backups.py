"""Commands that create and describe recovery points: backup, list, snapshots."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from rpfs.backup.pipeline import BackupOptions, backup, parse_disk_specs
from rpfs.commands import open_store, print_json, vault_of
from rpfs.commands.progress import ProgressBar, human_bytes
from rpfs.errors import EXIT_USAGE, RpfsError
from rpfs.host.untrusted import shown
from rpfs.upkeep.jobs import recorded


def cmd_backup(args) -> int:
    from rpfs.backup.quiesce import load_config
    consistency = load_config(Path(args.consistency_config)) if args.consistency_config else None
    if args.libvirt:
        from rpfs.backup.vm_backup import VmBackupOptions, backup_domain
        _refuse_disk_options(args)
        options = VmBackupOptions(consistency, set(args.exclude_disk or ()), args.require_consistency)

        def take(store, bar, begin):
            return backup_domain(store, args.vm, args.libvirt, progress=bar, options=options, started=begin)
    else:
        if not args.disk:
            raise RpfsError("give the disks: --disk NAME=PATH (repeat for each), or --libvirt DOMAIN", EXIT_USAGE)
        if args.exclude_disk or args.require_consistency:
            raise RpfsError("--exclude-disk and --require-consistency go with --libvirt DOMAIN", EXIT_USAGE)
        disks = parse_disk_specs(args.disk)
        options = BackupOptions(consistency=consistency, allow_live=args.allow_live,
                                keep_snapshot_days=args.keep_snapshot_days)

        def take(store, bar, begin):
            return backup(store, args.vm, disks, progress=bar, options=options, started=begin)
    with open_store(args) as store, recorded(store, "backup", args.vm, begun=False) as job:
        with ProgressBar(f"backup {args.vm}", quiet=args.json) as bar:
            point, summary = take(store, bar, job.begin)
        job.bytes_read, job.bytes_written, job.recovery_point = summary.disk_bytes_read, summary.stored_bytes, point.id
        if args.no_catalog:
            cataloged, why = None, "--no-catalog"
        else:   # imported here: every other command starts without the catalog's modules
            from rpfs.catalog.build import catalog_new_point
            cataloged, why = catalog_new_point(store, point)
    if why and not args.no_catalog:
        summary.notes.append(f"the point has no catalog of its files ({why}); rpfs catalog {point.vm} {point.id}"
                             " makes it")
    for note in summary.notes:
        print(f"rpfs: note: {note}", file=sys.stderr)
    if args.json:
        print_json({**asdict(summary), "mib_per_second": round(summary.mib_per_second, 1),
                     "recovery_point": point.to_dict(), "catalog": asdict(cataloged) if cataloged else None})
        return 0
    s = summary
    why = f": {shown(point.consistency_reason)}" if point.consistency_reason else ""
    print(f"recovery point {s.vm}/{s.point_id} ({point.consistency}{why}): {s.disks} disk(s) of"
          f" {human_bytes(s.bytes_read)} in {s.seconds:.1f} s; read {human_bytes(s.disk_bytes_read)} from the"
          f" disk(s), {s.mib_per_second:.0f} MiB/s")
    print(f"  raw: new {human_bytes(s.new_bytes)}, deduplicated {human_bytes(s.deduplicated_bytes)},"
          f" holes {human_bytes(s.zero_bytes)}, unchanged {human_bytes(s.unchanged_bytes)} (not read: change"
          f" tracking); stored: {human_bytes(s.stored_bytes)} new after compression")
    frozen = point.quiesce.get("guest", {}).get("frozen_seconds")
    if frozen:
        print(f"  the guest's file systems were frozen {frozen:.2f} s")
    for d in point.disks:
        if d.change_tracking_reason:
            print(f"  {d.name}: every block read ({shown(d.change_tracking_reason)})")
        elif d.change_tracking == "dirty-bitmap":
            print(f"  {d.name}: only what QEMU's dirty bitmap marks read ({human_bytes(d.read_bytes)})")
    if cataloged:
        from rpfs.commands.files import catalog_line
        print("  " + catalog_line(cataloged))
    return 0


def _refuse_disk_options(args) -> None:
    """A domain's disks come from libvirt: the options about named disks have no meaning there."""
    if args.disk:
        raise RpfsError("give either --libvirt DOMAIN (its disks are found) or --disk NAME=PATH, not both",
                        EXIT_USAGE)
    if args.allow_live or args.keep_snapshot_days:
        raise RpfsError("--allow-live and --keep-snapshot-days go with --disk: a running domain is read"
                        " through libvirt's backup job, never live", EXIT_USAGE)


def cmd_list(args) -> int:
    points, where = _listed_points(args)
    if args.json:
        print_json([{**p.to_dict(), "size": p.size, "stored_bytes": p.stored_bytes, "where": where[p.vm, p.id]}
                    for p in points])
        return 0
    if not points:
        print("no recovery points yet (rpfs backup VM --disk NAME=PATH)")
        return 0
    current_vm = None
    for p in points:
        if p.vm != current_vm:
            current_vm = p.vm
            print(f"{p.vm}")
        place = f"  {where[p.vm, p.id]:<5}" if args.vault else ""
        print(f"  {p.id}{place}  {p.consistency:<12} size {human_bytes(p.size):>10}"
              f"  stored {human_bytes(p.stored_bytes):>10}"
              f"  new stored {human_bytes(p.new_stored_bytes):>10}{_quiesce_note(p)}")
        for d in p.disks:
            tracking = f", {d.change_tracking}: read {human_bytes(d.read_bytes)}" if d.change_tracking else ""
            tracking += f" ({shown(d.change_tracking_reason)})" if d.change_tracking_reason else ""
            print(f"      {d.name + '.img':<16} size {human_bytes(d.size):>10}  stored {human_bytes(d.stored_bytes):>10}"
                  f"  {d.blocks} blocks, {d.zero_blocks} holes{tracking}")
    return 0


def _listed_points(args) -> tuple[list, dict[tuple[str, str], str]]:
    """The points of the store, or with --vault of the vault and of the store if there is one; and where each
    lives: local, vault or both."""
    local, held = [], []
    if not args.vault or (args.store and Path(args.store, "data.mdb").exists()):
        with open_store(args, readonly=True) as store:
            local = store.points(args.vm)
            if args.vm and not local and not args.vault:
                store.point(args.vm)  # raises: unknown VM
    if args.vault:
        with vault_of(args) as vault:
            held = vault.points(args.vm)
            if args.vm and not held and not local:
                vault.point(args.vm)  # raises: unknown VM
    where = {(p.vm, p.id): "local" for p in local}
    for p in held:
        where[p.vm, p.id] = "both" if (p.vm, p.id) in where else "vault"
    points = {(p.vm, p.id): p for p in [*held, *local]}   # the local record wins (pins, kept snapshots)
    return [points[key] for key in sorted(points)], where


def _quiesce_note(point) -> str:
    """pre/post script results, freeze time and kept snapshot, as a short suffix for `list`."""
    q, notes = point.quiesce, []
    if point.libvirt:
        notes.append(f"libvirt domain {point.libvirt.get('domain')}, {point.libvirt.get('state')}")
    if point.consistency_reason:
        notes.append(f"why: {shown(point.consistency_reason)}")
    guest = q.get("guest", {})
    if guest.get("frozen_seconds") is not None:
        notes.append(f"guest frozen {guest['frozen_seconds']:.2f} s")
    for phase in ("pre", "post"):
        if phase in q:
            notes.append(f"{phase} {'ok' if q[phase]['ok'] else 'failed: ' + q[phase]['message']}")
    if "freeze" in q:
        notes.append(f"frozen {q['freeze']['seconds']:.2f} s" + (" (watchdog thawed)" if q["freeze"]["watchdog_stepped_in"] else ""))
    if "read_live" in q:
        notes.append("read live: " + ", ".join(q["read_live"]))
    if point.snapshot:
        notes.append(f"snapshot kept until {point.snapshot.keep_until}")
    return f"  ({'; '.join(notes)})" if notes else ""


def cmd_snapshots(args) -> int:
    from datetime import datetime, timezone
    with open_store(args, readonly=True) as store:
        points = [p for p in store.points(args.vm) if p.snapshot]
    now = datetime.now(timezone.utc)
    found = [{"vm": p.vm, "recovery_point": p.id, "keep_until": p.snapshot.keep_until,
              "expired": p.snapshot.expired(now),
              "disks": {d: {"path": path, "exists": Path(path).exists()} for d, path in p.snapshot.paths.items()}}
             for p in points]
    if args.json:
        print_json(found)
        return 0
    if not found:
        print("no kept snapshots (rpfs backup --keep-snapshot-days N keeps the newest)")
    for f in found:
        print(f"{f['vm']}/{f['recovery_point']}  kept until {f['keep_until']}{'  (expired)' if f['expired'] else ''}")
        for disk, info in f["disks"].items():
            print(f"    {disk}: {info['path']}{'' if info['exists'] else '  (missing)'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of backup, list and snapshots; parents give every command --json and --key-file."""
    p = sub.add_parser("backup", parents=parents, help="back up the disks of a VM into a new recovery point")
    p.add_argument("vm", help="the VM's name (a new one is created by its first backup)")
    p.add_argument("--disk", action="append", metavar="NAME=PATH",
                   help="a disk of the VM: an image file or a block device (repeat for each disk)")
    p.add_argument("--no-catalog", action="store_true",
                   help="do not catalog the files inside the new point's disks (rpfs catalog can later)")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="back up every disk of this libvirt domain, running or shut off (instead of --disk)")
    p.add_argument("--exclude-disk", action="append", metavar="TARGET",
                   help="with --libvirt: leave this disk out (vdb, ...; repeat)")
    p.add_argument("--require-consistency", choices=("file-system", "application"),
                   help="with --libvirt: take no point unless it is at least this consistent")
    p.add_argument("--consistency-config", metavar="TOML",
                   help="pre/post scripts and filesystems to freeze for the snapshot (docs/manual/backup.md)")
    p.add_argument("--allow-live", action="store_true",
                   help="back up a disk in use that cannot be snapshotted (recorded as inconsistent)")
    p.add_argument("--keep-snapshot-days", type=float, default=0.0, metavar="DAYS",
                   help="keep the newest reflink snapshot this many days (default 0: delete it after the backup)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", parents=parents, help="list VMs, recovery points and disks")
    p.add_argument("vm", nargs="?", help="only this VM's recovery points (default: every VM)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("snapshots", parents=parents, help="kept reflink snapshots (the instant-restore tier)")
    p.add_argument("vm", nargs="?", help="only this VM's snapshots (default: every VM)")
    p.set_defaults(func=cmd_snapshots)
