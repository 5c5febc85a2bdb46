"""Commands that make rpfs run itself: policy, protect, unprotect, run, schedule."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from rpfs.commands import key_choice, open_store, print_json
from rpfs.commands.progress import ProgressBar
from rpfs.errors import EXIT_OK, EXIT_USER_ERROR, RpfsError
from rpfs.host.python_child import python_command
from rpfs.store.key_slots import KeyChoice

UNITS = {"daily": "days", "weekly": "weeks", "monthly": "months", "yearly": "years"}


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
    if args.catalog is not None:
        d["options"]["catalog"] = args.catalog == "yes"
    if args.require_consistency == "none":
        d["options"].pop("require_consistency", None)
    elif args.require_consistency is not None:
        d["options"]["require_consistency"] = args.require_consistency
    if args.policy_vault is not None:
        d["vault"] = args.policy_vault or None   # "": no vault any more
        if d["vault"] is None:
            d["vault_retention"] = None
    for key in ("keep_last", "daily", "weekly", "monthly", "yearly"):
        value = getattr(args, f"vault_keep_{key.removeprefix('keep_')}")
        if value is not None:
            d["vault_retention"] = {**(d.get("vault_retention") or {}), key: value}
    return d


def _policy_action(args) -> int:
    from rpfs.policy.policies import policy_from_dict, policy_from_toml, policy_to_dict
    from rpfs.policy.protection import delete_policy, get_policy, save_policy
    with open_store(args, readonly=args.action in ("list", "show")) as store:
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
        print_json([policy_to_dict(p) for p in shown])
        return 0
    if args.action == "delete":
        print(f"deleted policy {args.name}")
    for p in shown:
        sch = p.schedule
        when = {"daily": f"daily at {sch.at}", "weekly": f"{','.join(sch.weekdays)} at {sch.at}",
                "hourly": f"every {sch.every_hours} h"}[sch.kind]
        keep = ", ".join(f"{k.removeprefix('keep_')} {v}" for k, v in asdict(p.retention).items() if v)
        vault = ""
        if p.vault:
            kept = ", ".join(f"{k.removeprefix('keep_')} {v}" for k, v in asdict(p.vault_retention).items() if v) \
                if p.vault_retention else "every point"
            vault = f"; vault {p.vault} keeps {kept}"
        print(f"{p.name}: {when} UTC; keep {keep}; snapshot kept {p.keep_snapshot_days:g} day(s)"
              f"{'; consistency ' + p.consistency_config if p.consistency_config else ''}{vault}")
    return 0


def cmd_policy(args) -> int:
    if args.action in ("create", "update", "show", "delete", "import") and not args.name:
        raise RpfsError(f"rpfs policy {args.action} needs a {'TOML file' if args.action == 'import' else 'policy name'}")
    if args.action == "import":
        args.file = args.name
    return _policy_action(args)


def cmd_protect(args) -> int:
    from rpfs.policy.protection import protect
    with open_store(args) as store:
        protection = protect(store, args.vm, args.policy, args.disk, args.temporary_disk, args.libvirt or "")
    if args.json:
        print_json(asdict(protection))
    else:
        disks = f"libvirt domain {protection.libvirt} (its disks found at each backup)" if protection.libvirt \
            else f"disks {', '.join(protection.disks)}"
        print(f"{args.vm} protected by policy {args.policy}: {disks}"
              f"{'; temporary (not backed up): ' + ', '.join(protection.temporary) if protection.temporary else ''}")
    return 0


def cmd_unprotect(args) -> int:
    from rpfs.policy.protection import unprotect
    if args.keep_data == args.delete_data:
        raise RpfsError("say what happens to the recovery points: --keep-data or --delete-data")
    with open_store(args) as store:
        deleted = unprotect(store, args.vm, delete_data=args.delete_data)
    if args.json:
        print_json({"vm": args.vm, "deleted_recovery_points": deleted})
    else:
        print(f"{args.vm} is no longer protected; " + (f"{deleted} recovery point(s) deleted (rpfs gc frees the space)"
                                                        if args.delete_data else "its recovery points stay restorable"))
    return 0


def cmd_run(args) -> int:
    from rpfs.policy.run import run
    with open_store(args) as store:
        result = run(store, stagger_seconds=args.stagger_seconds,
                     progress_for=lambda vm: ProgressBar(f"backup {vm}", quiet=args.json))
    if args.json:
        print_json(asdict(result))
    else:
        print(f"backed up: {', '.join(result.backed_up) or 'none'}; not due: {len(result.not_due)}")
        for vm, ids in result.pruned.items():
            print(f"pruned {vm}: {', '.join(ids)}")
        for vm, ids in result.pushed.items():
            print(f"pushed {vm}: {', '.join(ids) or 'nothing new'}")
        for where, ids in result.vault_pruned.items():
            print(f"pruned in vault {where}: {', '.join(ids)}")
        for vm, error in result.failed.items():
            print(f"FAILED {vm}: {error}")
        for vm, error in result.catalog_failed.items():
            print(f"note: {vm}'s new point has no catalog ({error}); rpfs catalog {vm} makes it")
        for step, error in result.push_failed.items():
            print(f"FAILED {step}: {error}" + ("" if step == "vault prune" else
                                                " (the points stay local; the next run pushes them)"))
    return EXIT_USER_ERROR if result.failed or result.push_failed else EXIT_OK   # each failure said above


def _timer_key_file(args) -> str | None:
    """An encrypted store's timer runs with a key file, which must open the store."""
    with open_store(args, readonly=True, unlock=False) as store:
        if not store.encrypted:
            return None
    key_file = key_choice(args).key_file
    if not key_file:
        raise RpfsError(f"store {args.store} is encrypted and a timer cannot type a passphrase: give --key-file PATH"
                        " (rpfs key add --new-key-file PATH makes one)")
    args._key_choice = KeyChoice(key_file=key_file)   # the key file alone must open it
    open_store(args, readonly=True).close()
    return os.path.abspath(key_file)


def cmd_schedule(args) -> int:
    import shlex
    import subprocess

    from rpfs.policy.schedule import systemd_units
    if not args.store:
        raise RpfsError("no store given: use --store DIR or set RPFS_STORE")
    key_file = _timer_key_file(args)
    units = systemd_units(shlex.join(python_command("rpfs")), str(Path(args.store).absolute()), args.interval,
                          key_file)
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


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of policy, protect, unprotect, run and schedule; parents give every command --json and --key-file."""
    p = sub.add_parser("policy", parents=parents, help="protection policies: schedule, retention, snapshots")
    p.add_argument("action", choices=["create", "update", "import", "list", "show", "delete"],
                   help="what to do: create or update one from the options below, import a TOML file, list"
                        " them, show or delete one")
    p.add_argument("name", nargs="?", help="policy name (for import: the TOML file)")
    p.add_argument("--daily", metavar="HH:MM", help="back up every day at this time")
    p.add_argument("--weekdays", metavar="mon,thu", help="back up on these days (at --at)")
    p.add_argument("--at", metavar="HH:MM", help="the time of day for --weekdays")
    p.add_argument("--every-hours", type=int, metavar="N", help="back up every N hours")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N recovery points")
    for period in ("daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{period}", type=int, metavar="N",
                       help=f"keep the newest recovery point of each of the last N {UNITS[period]}")
    p.add_argument("--keep-snapshot-days", type=float, metavar="DAYS",
                   help="keep each backup's reflink snapshot this many days (the instant-restore tier)")
    p.add_argument("--consistency-config", metavar="TOML", help="pre/post scripts and filesystems to freeze")
    p.add_argument("--allow-live", choices=["yes", "no"],
                   help="back up a disk in use that cannot be snapshotted (recorded as inconsistent)")
    p.add_argument("--catalog", choices=["yes", "no"],
                   help="catalog the files inside each new point, for rpfs find (default yes)")
    p.add_argument("--require-consistency", choices=["file-system", "application", "none"],
                   help="a libvirt domain's backup takes no point unless at least this consistent")
    p.add_argument("--replace", action="store_true", help="import over an existing policy")
    p.add_argument("--vault", dest="policy_vault", metavar="NAME",
                   help="push each new recovery point to this vault (rpfs vault add); '' for none")
    for period in ("last", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--vault-keep-{period}", type=int, metavar="N",
                       help="what the vault keeps (as --keep-*); none given: every point" if period == "last"
                       else f"as --keep-{period}, in the vault")
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("protect", parents=parents, help="protect a VM with a policy")
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--policy", required=True, help="the policy's name (rpfs policy list)")
    p.add_argument("--disk", action="append", default=[], metavar="NAME=PATH",
                   help="a disk of the VM: an image file or a block device (repeat for each disk)")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="a libvirt domain: its disks are found at each backup (instead of --disk)")
    p.add_argument("--temporary-disk", action="append", default=[], metavar="NAME=PATH",
                   help="a disk that is never backed up nor counted (like a VM's temporary disk; with"
                        " --libvirt its target, e.g. vdb)")
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("unprotect", parents=parents, help="stop protecting a VM")
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--keep-data", action="store_true", help="its recovery points stay restorable")
    p.add_argument("--delete-data", action="store_true", help="delete its recovery points")
    p.set_defaults(func=cmd_unprotect)

    p = sub.add_parser("run", parents=parents, help="every backup that is due, then prune (for a timer)")
    p.add_argument("--stagger-seconds", type=float, default=60.0,
                   help="spread the starts of VMs due at once over this many seconds (default 60)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("schedule", parents=parents, help="systemd service and timer that run `rpfs run`")
    p.add_argument("--install", action="store_true", help="write and enable the units")
    p.add_argument("--print", action="store_true", help="print the units")
    p.add_argument("--interval", default="*:0/15", help="systemd OnCalendar of the checks (default every 15 min)")
    p.add_argument("--unit-dir", default="/etc/systemd/system", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_schedule)
