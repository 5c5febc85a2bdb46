"""Commands that mount and attach: mount, umount, attach, detach."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from rpfs.commands import key_choice, open_source, print_json
from rpfs.commands.progress import human_bytes
from rpfs.store.source import SourceName


def cmd_mount(args) -> int:
    from rpfs.serve import daemon, store_mount
    cache_bytes = args.cache_mb << 20
    if args.foreground:
        mountpoint = daemon.check_mountpoint(Path(args.mountpoint))
        ready_fd = args.ready_fd
        master_key = key_choice(args).master   # handed down by `rpfs mount` (a daemon asks no passphrase)
        if master_key is None:   # rpfs mount --foreground, run by hand: unlocked here, once
            with open_source(args) as store:
                master_key = store.master_key
        name = SourceName(vault=args.vault) if args.vault else SourceName(store=Path(args.store or ""))
        filesystem = lambda: store_mount.store_filesystem(name, cache_bytes, args.allow_group, master_key)  # noqa: E731
        daemon.serve(filesystem, mountpoint, ready_fd=ready_fd, debug=args.debug,
                     log_file=Path(args.log_file) if args.log_file else None)
        return 0
    with open_source(args) as store:   # fails here, in one line, when it cannot be opened
        pid = store_mount.start_store_daemon(store, Path(args.mountpoint), cache_bytes, args.allow_group)
    if args.json:
        print_json({"mountpoint": str(Path(args.mountpoint).resolve()), "pid": pid, "allow_group": args.allow_group})
    else:
        readers = f"root and group {args.allow_group}" if args.allow_group else "root only"
        source = f"vault {args.vault}" if args.vault else args.store
        print(f"mounted {source} at {args.mountpoint} (daemon pid {pid}; readable by {readers});"
              f" unmount with: rpfs umount {args.mountpoint}")
    return 0


def cmd_umount(args) -> int:
    from rpfs.serve import daemon
    daemon.unmount(Path(args.mountpoint))
    if args.json:
        print_json({"unmounted": str(Path(args.mountpoint).absolute())})
    else:
        print(f"unmounted {args.mountpoint}")
    return 0


def cmd_attach(args) -> int:
    """An image file or device, or VM[/ID] of the store (every disk of that recovery point)."""
    from rpfs.attach import filesystems as attach_mod
    source = Path(args.source)
    if source.exists() or not (args.store or args.vault):
        found = {"": attach_mod.attach(source, Path(args.dest))}
    else:
        from rpfs.attach.vm import attach_point
        vm, _, point_id = args.source.partition("/")
        with open_source(args) as store:
            point = store.point(vm, point_id or None)
            found = attach_point(store, point, Path(args.dest))
    if args.json:
        if "" in found:
            print_json([asdict(f) for f in found[""]])
        else:
            print_json({"vm": point.vm, "recovery_point": point.id, "dest": str(Path(args.dest).absolute()),
                         "disks": [{"disk": d, "filesystems": [asdict(f) for f in fs]} for d, fs in found.items()]})
        return 0
    for disk, filesystems in found.items():
        for f in filesystems:
            where = f.mountpoint if f.status == "mounted" else f.status
            print(f"{disk + ' ' if disk else ''}{f.name:<6} {f.fstype or '-':<10} {human_bytes(f.size):>10}  {where}")
    return 0


def cmd_detach(args) -> int:
    from rpfs.attach.vm import detach_point_or_image
    undone = detach_point_or_image(Path(args.dest))
    if args.json:
        print_json({"unmounted": [str(u) for u in undone]})
    else:
        print(f"detached {len(undone)} filesystem(s) from {args.dest}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of mount, umount, attach and detach; parents give every command --json and --key-file."""
    p = sub.add_parser("mount", parents=parents, help="mount the store read-only (FUSE)")
    p.add_argument("mountpoint", help="an empty folder to mount on")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--cache-mb", type=int, default=256, help="decoded-block cache size in MiB (default 256)")
    p.add_argument("--allow-group", metavar="GROUP",
                   help="let this group's members read the images too (default: root only)")
    p.add_argument("--debug", action="store_true", help="log every error in detail")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", parents=parents, help="unmount a store mount (also one whose daemon died)")
    p.add_argument("mountpoint", help="where it is mounted")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("attach", parents=parents,
                       help="mount every filesystem of a disk image, or of every disk of VM[/ID], read-only")
    p.add_argument("source", metavar="IMAGE|VM[/ID]",
                   help="an image file or block device; or a VM of the store, optionally /ID (default: latest)")
    p.add_argument("dest", help="the folder to mount the filesystems on (made if missing)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("detach", parents=parents, help="undo rpfs attach")
    p.add_argument("dest", help="the folder given to rpfs attach")
    p.set_defaults(func=cmd_detach)
