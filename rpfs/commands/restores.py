"""Commands that bring data back: restore, instant-restore (and its daemon), instant-wait, instant-stop, jobs."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from rpfs.commands import key_choice, open_source, open_store, print_json, store_and_job
from rpfs.commands.arguments import octal_mode, rate
from rpfs.commands.progress import ProgressBar, human_bytes
from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place


def cmd_restore(args) -> int:
    from rpfs.restore.full import check_target, restore_disk
    if args.to_libvirt:
        return _restore_as_vm(args)
    if args.format or args.instant or args.start:
        raise RpfsError("--format, --instant and --start go with --to-libvirt NAME")
    with store_and_job(args, "restore", args.vm) as (store, job):
        point = store.point(args.vm, args.recovery_point)
        job.recovery_point = point.id
        if args.disk:
            jobs = [(point.disk(args.disk).name, Path(args.to))]
            if check_target(Path(args.to), point.disk(args.disk).size, args.force) and args.mode is not None:
                raise RpfsError(f"--mode: {args.to} is a block device; its mode is not the restore's to set")
        else:
            folder = Path(args.to)
            check_trusted_place(folder, "restore folder", private=True)   # root writes in it
            if folder.exists() and not folder.is_dir():
                raise RpfsError(f"{folder} is not a folder (to restore one disk to a file, add --disk NAME)")
            jobs = [(d.name, folder / f"{d.name}.img") for d in point.disks]
            for name, target in jobs:   # refuse before writing anything
                folder.mkdir(parents=True, exist_ok=True)
                check_target(target, point.disk(name).size, args.force)   # the folder checked again, now made
        job.begin()   # refused before this (unknown VM, point or disk, an existing target): no job
        summaries = []
        for name, target in jobs:
            with ProgressBar(f"restore {name}", quiet=args.json) as bar:
                summaries.append(restore_disk(store, point, name, target, force=args.force,
                                              discard=args.discard, progress=bar, mode=args.mode))
            job.bytes_read += summaries[-1].written_bytes   # raw bytes of data blocks read from the store
            job.bytes_written += summaries[-1].written_bytes
    if args.json:
        print_json({"vm": point.vm, "recovery_point": point.id,
                     "disks": [{**asdict(s), "mib_per_second": round(s.mib_per_second, 1)} for s in summaries]})
        return 0
    for s in summaries:
        device = f": {human_bytes(s.discarded_bytes)} discarded, {human_bytes(s.zeroed_bytes)} zeroed" \
            if s.discarded_bytes or s.zeroed_bytes else ""
        print(f"restored {s.vm}/{s.point_id}/{s.disk} to {s.target}: {human_bytes(s.size)} in {s.seconds:.1f} s"
              f" ({s.mib_per_second:.0f} MiB/s of image; raw: {human_bytes(s.written_bytes)} data,"
              f" {human_bytes(s.hole_bytes)} holes"
              f"{device})")
    return 0


def _restore_as_vm(args) -> int:
    """rpfs restore VM [ID] --to-libvirt NAME --to FOLDER: the point as a new libvirt domain."""
    from rpfs.restore.as_vm import carry_out, plan_restore_as_vm
    for given, option in ((args.disk, "--disk"), (args.force, "--force"), (args.discard, "--discard"),
                          (args.mode is not None, "--mode")):
        if given:
            raise RpfsError(f"{option} does not go with --to-libvirt (every disk the point has is restored)")
    with store_and_job(args, "restore", args.vm) as (store, job):
        point = store.point(args.vm, args.recovery_point)
        job.recovery_point = point.id
        plan = plan_restore_as_vm(point, args.to_libvirt, Path(args.to), args.format or "raw", args.instant)
        job.begin()   # refused before this (a name taken, no libvirt XML, a file there): no job
        done = carry_out(store, point, plan, lambda label: ProgressBar(label, quiet=args.json), args.start)
    if args.json:
        print_json(asdict(done))
        return 0
    files = ", ".join(f"{t}: {p}" for t, p in done.files.items()) or "none"
    how = "instant-restore images" if done.instant else f"{done.format} files"
    print(f"defined libvirt domain {done.domain} ({done.uuid}) from {done.vm}/{done.point_id}, its disks"
          f" {how} ({files}){'; started' if done.started else ''}")
    if done.instant:
        print(f"its disks are loop devices over images served while they are copied into those files"
              f" ({', '.join(done.disks.values())}): once rpfs jobs says complete, shut {done.domain} down,"
              " point its disks at the files (virsh edit), losetup -d the devices and rpfs instant-stop each file",
              file=sys.stderr)
    return 0


def cmd_overlay(args) -> int:
    from rpfs.restore.overlay import create_overlay
    with open_store(args) as store:
        point = store.point(args.vm, args.recovery_point)
        backing = create_overlay(store, point, args.disk, Path(args.mount), Path(args.to))
    if args.json:
        print_json({"overlay": str(Path(args.to).absolute()), "backing": str(backing), "vm": point.vm,
                    "recovery_point": point.id, "pinned": True})
    else:
        print(f"created {args.to} (qcow2) over {backing}; {point.vm}/{point.id} is pinned so prune keeps it"
              f" (rpfs unpin {point.vm} {point.id} once the overlay is no longer used)")
    return 0


def cmd_instant_restore(args) -> int:
    from rpfs.restore import instant
    with open_source(args) as store:
        point = store.point(args.vm, args.recovery_point)
        job = instant.start(store, point, args.disk, Path(args.to), args.copy_mbps)
    if not args.json:
        print(job.image)
        print(f"writable image of {job.vm}/{job.point_id}/{job.disk} ready; copying into {job.target} in the"
              f" background ({job.copied_blocks}/{job.blocks} blocks so far). Attach it read-write, e.g."
              f" losetup --find --show {job.image}", file=sys.stderr)
    if args.wait:
        with ProgressBar(f"copy {job.disk}", quiet=args.json) as bar:
            job = instant.wait(Path(job.target), progress=bar)
    if args.json:
        print_json(asdict(job))
    elif args.wait:
        print(_complete(job), file=sys.stderr)
    return 0


def cmd_instant_daemon(args) -> int:
    from rpfs.restore import instant
    from rpfs.serve import daemon
    target = Path(args.target)
    master_key = key_choice(args).master   # handed down by instant-restore
    rate = args.copy_mbps * (1 << 20)
    daemon.serve(lambda: instant.instant_filesystem(target, rate, master_key), Path(args.mountpoint),
                 ready_fd=args.ready_fd,
                log_file=Path(args.log_file) if args.log_file else None)
    return 0


def cmd_instant_wait(args) -> int:
    from rpfs.restore import instant
    with ProgressBar("copy", quiet=args.json) as bar:
        job = instant.wait(Path(args.target), progress=bar)
    if args.json:
        print_json(asdict(job))
    else:
        print(_complete(job))
    return 0


def _complete(job) -> str:
    """What a complete copy means for whoever runs on the served image: it still goes through the daemon
    (pyfuse3 cannot hand the file to the kernel: docs/manual/restore.md)."""
    from rpfs.host.disk_use import users_under
    done = f"copy complete: {job.target} is a standalone image"
    users = users_under(job.mountpoint) if job.pid else []   # still served
    if not users:
        return f"{done} (stop serving {job.image}: rpfs instant-stop {job.target})"
    return (f"{done}, but {', '.join(users)} still use(s) {job.image}, whose reads and writes go through the rpfs"
            f" daemon: shut the VM down (or detach), start it on {job.target}, then rpfs instant-stop {job.target}")


def cmd_instant_stop(args) -> int:
    from rpfs.restore import instant
    if args.discard:
        return _discard(args)
    job = instant.stop(Path(args.target))
    if args.json:
        print_json(asdict(job))
    elif job.state == "complete":
        print(f"stopped; {job.target} is a standalone image")
    elif job.state == "discarded":
        print(f"forgot the instant restore into {job.target}: it was discarded")
    else:
        print(f"stopped at {job.copied_blocks}/{job.blocks} blocks; resume with: rpfs instant-restore {job.vm}"
              f" {job.point_id} --disk {job.disk} --to {job.target}")
    return 0


def _discard(args) -> int:
    from rpfs.restore import instant
    done = instant.discard(Path(args.target), Path(args.store) if args.store else None,
                           vault_name=args.vault or "")
    if args.json:
        print_json(asdict(done))
        return 0
    what = f"{done.vm}/{done.point_id}/{done.disk}" if done.vm else "the instant restore"
    kept = f"; {done.target} is complete and stays" if done.was == "complete" else ""
    print(f"discarded {what} into {done.target}{kept}; removed: {', '.join(done.removed) or 'nothing more'}")
    return 0


def _moved(job) -> str:
    """What a job moved, in words of its kind, raw or stored said."""
    read, written = human_bytes(job.bytes_read), human_bytes(job.bytes_written)
    return {"backup": f"read {read} from the disks, stored {written}",
            "restore": f"restored {written} of data (raw)",
            "verify": f"checked {read} of distinct blocks (raw)",
            "push": f"uploaded {written} stored",
            "gc": f"freed {written} stored",
            "prune": f"pruned {job.bytes_written} point(s)"}.get(job.kind, "")


def cmd_jobs(args) -> int:
    from rpfs.restore import instant
    from rpfs.upkeep.jobs import list_jobs
    store_jobs = []
    if args.store:
        with open_store(args, readonly=True) as store:
            store_jobs = list_jobs(store, running_only=args.running)
    found = instant.jobs()
    if args.running:
        found = [j for j in found if j.state == "copying"]
    if args.json:
        print_json({"jobs": [asdict(j) for j in store_jobs], "instant_restores": [asdict(j) for j in found]})
        return 0
    if not store_jobs and not found:
        print("no jobs" + ("" if args.store else " (give --store to see backups, restores, prune, gc, verify)"))
    for j in store_jobs:
        print(f"{j.id}  {j.kind:<8} {j.vm or '-':<12} {j.status:<10} {j.start} -> {j.end or '...'}  {_moved(j)}"
              f"{'  ' + j.recovery_point if j.recovery_point else ''}{'  error: ' + j.error if j.error else ''}")
    for j in found:
        percent = 100.0 * j.copied_blocks / j.blocks if j.blocks else 100.0
        print(f"instant-restore {j.vm}/{j.point_id}/{j.disk} -> {j.target}: {j.state} {percent:.1f}%"
              f" ({j.copied_blocks}/{j.blocks} blocks){'  image ' + j.image if j.state != 'stopped' else ''}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of restore, overlay, instant-restore, instant-wait, instant-stop, jobs and instant-daemon; parents give every command --json and --key-file."""
    p = sub.add_parser("restore", parents=parents, help="write a recovery point's disks back (full restore)")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="folder for DISK.img files; with --disk, the file or block device to write; with"
                        " --to-libvirt, the folder for NAME-DISK.img (or .qcow2) files")
    p.add_argument("--to-libvirt", metavar="NAME",
                   help="restore a libvirt domain's point as a new domain NAME (new UUID and MAC addresses),"
                        " its disks in --to; the original domain is not touched")
    p.add_argument("--format", choices=("raw", "qcow2"),
                   help="with --to-libvirt: the disk files' format (default raw)")
    p.add_argument("--instant", action="store_true",
                   help="with --to-libvirt: the disks are instant-restore images, usable at once, copied"
                        " into --to in the background")
    p.add_argument("--start", action="store_true", help="with --to-libvirt: start the new domain")
    p.add_argument("--disk", help="restore only this disk")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--discard", action="store_true",
                   help="on a block device, free the disk's holes where the device guarantees they then read as"
                        " zeros (a loop device's file, a thin device), write zeros where it does not; the summary"
                        " says which was done")
    p.add_argument("--mode", type=octal_mode, metavar="OCTAL",
                   help="the mode of a restored image file (default 600: root's alone, whatever the backed-up"
                        " file's mode was; a disk image holds everything on the disk)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("overlay", parents=parents,
                       help="a qcow2 overlay over a recovery point's image in the store mount (the VM way)")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest, recorded by its id)")
    p.add_argument("--disk", required=True, help="the disk the overlay is for")
    p.add_argument("--mount", required=True, metavar="MOUNTPOINT", help="where the store is mounted (rpfs mount)")
    p.add_argument("--to", required=True, metavar="FILE.qcow2", help="the overlay to create")
    p.set_defaults(func=cmd_overlay)

    p = sub.add_parser("instant-restore", parents=parents,
                       help="a writable disk image at once, copied out of the store in the background")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest)")
    p.add_argument("--disk", required=True, help="the disk to restore")
    p.add_argument("--to", required=True, metavar="PATH", help="the image file the copy ends up in")
    p.add_argument("--wait", action="store_true", help="return only when the copy is complete")
    p.add_argument("--copy-mbps", type=rate, default=0.0, metavar="MIB/S",
                   help="limit the background copy to this many MiB/s (default: no limit)")
    p.set_defaults(func=cmd_instant_restore)

    p = sub.add_parser("instant-wait", parents=parents, help="wait until an instant restore's copy is complete")
    p.add_argument("target", metavar="FILE", help="the instant restore's target (its --to)")
    p.set_defaults(func=cmd_instant_wait)

    p = sub.add_parser("instant-stop", parents=parents,
                       help="stop serving an instant restore's image (an unfinished copy stays resumable)")
    p.add_argument("target", metavar="FILE", help="the instant restore's target (its --to)")
    p.add_argument("--discard", action="store_true",
                   help="also abandon it: remove the unfinished copy (and the writes made to it), its state"
                        " file, its hold on the recovery point and its record; a complete FILE is kept"
                        " (rpfs --vault NAME instant-stop --discard: also a vault hold left with no record)")
    p.set_defaults(func=cmd_instant_stop)

    p = sub.add_parser("jobs", parents=parents,
                       help="backups, restores, prune, gc and verify recorded in the store; instant restores")
    p.add_argument("--running", action="store_true", help="only jobs still running")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("instant-daemon")   # started by instant-restore; not for users
    p.add_argument("target")
    p.add_argument("mountpoint")
    p.add_argument("--copy-mbps", type=rate, default=0.0)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log-file")
    p.add_argument("--key-fd", type=int)
    p.set_defaults(func=cmd_instant_daemon)
