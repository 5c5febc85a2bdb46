"""The `rpfs` command: the argument parser, and the one place where errors become a line on stderr.

The subcommands live in rpfs/commands/, one small function each.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rpfs.commands import take_passphrases
from rpfs.commands.backups import cmd_backup, cmd_list, cmd_snapshots
from rpfs.commands.keys import cmd_info, cmd_init, cmd_key
from rpfs.commands.mounts import cmd_attach, cmd_detach, cmd_mount, cmd_umount
from rpfs.commands.protecting import cmd_policy, cmd_protect, cmd_run, cmd_schedule, cmd_unprotect
from rpfs.commands.restores import (
    cmd_instant_daemon,
    cmd_instant_restore,
    cmd_instant_stop,
    cmd_instant_wait,
    cmd_jobs,
    cmd_overlay,
    cmd_restore,
)
from rpfs.commands.upkeep import cmd_check, cmd_compact, cmd_gc, cmd_pin, cmd_prune, cmd_usage, cmd_verify
from rpfs.commands.vaults import cmd_vault
from rpfs.errors import RpfsError
from rpfs.host.access import permission_denied
from rpfs.store.blob import DEFAULT_ZSTD_LEVEL
from rpfs.store.store import DEFAULT_BLOCK_SIZE, ENCRYPTION, DatabaseError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"rpfs: {message} (see rpfs --help)\n")


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode in octal, 0-777 (e.g. 640)")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):   # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in MiB/s (0: no limit)")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("rpfs")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "(not installed)"


UNITS = {"daily": "days", "weekly": "weeks", "monthly": "months", "yearly": "years"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rpfs", description="Recovery-point filesystem: back up disk images, mount and restore them.")
    parser.add_argument("--version", action="version", version=f"rpfs {_version()}")
    parser.add_argument("--store", default=os.environ.get("RPFS_STORE"),
                        help="store directory (default: $RPFS_STORE)")
    parser.add_argument("--vault", metavar="NAME",
                        help="read recovery points from this vault (rpfs vault add) instead of the store: list,"
                             " restore, instant-restore, mount, attach, verify; works with no local store")
    key_help = ("key file of an encrypted store (default: $RPFS_KEY_FILE; else a passphrase from $RPFS_PASSPHRASE"
                " or the terminal)")
    parser.add_argument("--key-file", metavar="PATH", help=key_help)
    parser.add_argument("--recovery-key", metavar="FILE",
                        help="open the store or vault with the recovery private key (X25519, PEM) instead: for"
                             " disaster recovery when the key file and passphrase are lost")
    # Every subcommand takes --key-file too (before or after its own arguments) and --json.
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print machine-readable JSON")
    json_flag.add_argument("--key-file", metavar="PATH", default=argparse.SUPPRESS, help=key_help)
    json_flag.add_argument("--key-fd", type=int, help=argparse.SUPPRESS)   # a master key from rpfs itself

    p = sub.add_parser("init", parents=[json_flag], help="create a store")
    p.add_argument("--block-size", default=str(DEFAULT_BLOCK_SIZE), help="block size (default 1M)")
    p.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL,
                   help=f"compression level for new blocks, 1-19 (default {DEFAULT_ZSTD_LEVEL}: fastest)")
    p.add_argument("--encryption", choices=[ENCRYPTION, "none"], default=ENCRYPTION,
                   help=f"encrypt blocks and catalog (default {ENCRYPTION}); the key: --key-file PATH (made if"
                        " missing) and/or a passphrase ($RPFS_PASSPHRASE or the terminal)")
    p.add_argument("--recovery-public-key", metavar="FILE",
                   help="also wrap the key for this X25519 public key (PEM); its private key, kept offline,"
                        " recovers the store (rpfs key recover)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("info", parents=[json_flag],
                       help="what a store is: format, encryption, key slots (no key needed)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("key", help="the keys of an encrypted store: list, add, remove, passwd, export, recover")
    keys = p.add_subparsers(dest="key_action", required=True, metavar="ACTION", parser_class=_Parser)
    keys.add_parser("list", parents=[json_flag], help="the key slots (no key needed)")
    new_slot = _Parser(add_help=False)
    new_slot.add_argument("--new-key-file", metavar="PATH", help="a key file (made, mode 0600, if missing)")
    new_slot.add_argument("--new-passphrase", action="store_true",
                          help="a passphrase ($RPFS_NEW_PASSPHRASE, or asked twice on the terminal)")
    k = keys.add_parser("add", parents=[json_flag, new_slot], help="add a key slot (opened with a key you have)")
    k.add_argument("--recovery-public-key", metavar="FILE",
                   help="a recovery slot for this X25519 public key (PEM); keep its private key offline")
    k = keys.add_parser("remove", parents=[json_flag], help="remove a key slot (never the last one)")
    k.add_argument("slot", help="the slot id (rpfs key list)")
    k = keys.add_parser("passwd", parents=[json_flag], help="change a passphrase (its slot, nothing else)")
    k.add_argument("slot", nargs="?", help="the passphrase slot (default: the one your passphrase opens)")
    k = keys.add_parser("export", parents=[json_flag], help="print the master key (to print on paper and lock away)")
    k.add_argument("--paper", action="store_true", required=True, help="as text with a checksum, to type back in")
    k = keys.add_parser("recover", parents=[json_flag, new_slot],
                        help="add a key file or passphrase, opening the store with the recovery private key or paper")
    k.add_argument("--private-key", metavar="FILE", help="the recovery private key (X25519, PEM)")
    k.add_argument("--paper", metavar="FILE", help="the paper key as typed back in ('-': standard input)")
    k.set_defaults(recovery_public_key=None)
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("backup", parents=[json_flag], help="back up the disks of a VM into a new recovery point")
    p.add_argument("vm", help="the VM's name (a new one is created by its first backup)")
    p.add_argument("--disk", action="append", required=True, metavar="NAME=PATH",
                   help="a disk of the VM: an image file or a block device (repeat for each disk)")
    p.add_argument("--consistency-config", metavar="TOML",
                   help="pre/post scripts and filesystems to freeze for the snapshot (see README)")
    p.add_argument("--allow-live", action="store_true",
                   help="back up a disk in use that cannot be snapshotted (recorded as inconsistent)")
    p.add_argument("--keep-snapshot-days", type=float, default=0.0, metavar="DAYS",
                   help="keep the newest reflink snapshot this many days (default 0: delete it after the backup)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", parents=[json_flag], help="list VMs, recovery points and disks")
    p.add_argument("vm", nargs="?", help="only this VM's recovery points (default: every VM)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("snapshots", parents=[json_flag], help="kept reflink snapshots (the instant-restore tier)")
    p.add_argument("vm", nargs="?", help="only this VM's snapshots (default: every VM)")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("restore", parents=[json_flag], help="write a recovery point's disks back (full restore)")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="folder for DISK.img files; with --disk, the file or block device to write")
    p.add_argument("--disk", help="restore only this disk")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--discard", action="store_true",
                   help="on a block device, free the disk's holes where the device guarantees they then read as"
                        " zeros (a loop device's file, a thin device), write zeros where it does not; the summary"
                        " says which was done")
    p.add_argument("--mode", type=_mode, metavar="OCTAL",
                   help="the mode of a restored image file (default 600: root's alone, whatever the backed-up"
                        " file's mode was; a disk image holds everything on the disk)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("overlay", parents=[json_flag],
                       help="a qcow2 overlay over a recovery point's image in the store mount (the VM way)")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest, recorded by its id)")
    p.add_argument("--disk", required=True, help="the disk the overlay is for")
    p.add_argument("--mount", required=True, metavar="MOUNTPOINT", help="where the store is mounted (rpfs mount)")
    p.add_argument("--to", required=True, metavar="FILE.qcow2", help="the overlay to create")
    p.set_defaults(func=cmd_overlay)

    p = sub.add_parser("instant-restore", parents=[json_flag],
                       help="a writable disk image at once, copied out of the store in the background")
    p.add_argument("vm", help="the VM whose recovery point it is")
    p.add_argument("recovery_point", nargs="?", help="recovery point id (default: the latest)")
    p.add_argument("--disk", required=True, help="the disk to restore")
    p.add_argument("--to", required=True, metavar="PATH", help="the image file the copy ends up in")
    p.add_argument("--wait", action="store_true", help="return only when the copy is complete")
    p.add_argument("--copy-mbps", type=_rate, default=0.0, metavar="MIB/S",
                   help="limit the background copy to this many MiB/s (default: no limit)")
    p.set_defaults(func=cmd_instant_restore)

    p = sub.add_parser("instant-wait", parents=[json_flag], help="wait until an instant restore's copy is complete")
    p.add_argument("target", metavar="FILE", help="the instant restore's target (its --to)")
    p.set_defaults(func=cmd_instant_wait)

    p = sub.add_parser("instant-stop", parents=[json_flag],
                       help="stop serving an instant restore's image (an unfinished copy stays resumable)")
    p.add_argument("target", metavar="FILE", help="the instant restore's target (its --to)")
    p.add_argument("--discard", action="store_true",
                   help="also abandon it: remove the unfinished copy (and the writes made to it), its state"
                        " file, its hold on the recovery point and its record; a complete FILE is kept"
                        " (rpfs --vault NAME instant-stop --discard: also a vault hold left with no record)")
    p.set_defaults(func=cmd_instant_stop)

    p = sub.add_parser("jobs", parents=[json_flag],
                       help="backups, restores, prune, gc and verify recorded in the store; instant restores")
    p.add_argument("--running", action="store_true", help="only jobs still running")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("policy", parents=[json_flag], help="protection policies: schedule, retention, snapshots")
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
    p.add_argument("--replace", action="store_true", help="import over an existing policy")
    p.add_argument("--vault", dest="policy_vault", metavar="NAME",
                   help="push each new recovery point to this vault (rpfs vault add); '' for none")
    for period in ("last", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--vault-keep-{period}", type=int, metavar="N",
                       help="what the vault keeps (as --keep-*); none given: every point" if period == "last"
                       else f"as --keep-{period}, in the vault")
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("protect", parents=[json_flag], help="protect a VM with a policy")
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--policy", required=True, help="the policy's name (rpfs policy list)")
    p.add_argument("--disk", action="append", default=[], metavar="NAME=PATH",
                   help="a disk of the VM: an image file or a block device (repeat for each disk)")
    p.add_argument("--temporary-disk", action="append", default=[], metavar="NAME=PATH",
                   help="a disk that is never backed up nor counted (like a VM's temporary disk)")
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("unprotect", parents=[json_flag], help="stop protecting a VM")
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--keep-data", action="store_true", help="its recovery points stay restorable")
    p.add_argument("--delete-data", action="store_true", help="delete its recovery points")
    p.set_defaults(func=cmd_unprotect)

    p = sub.add_parser("run", parents=[json_flag], help="every backup that is due, then prune (for a timer)")
    p.add_argument("--stagger-seconds", type=float, default=60.0,
                   help="spread the starts of VMs due at once over this many seconds (default 60)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", parents=[json_flag], help="delete recovery points the policies no longer keep")
    p.add_argument("vm", nargs="?", help="only this VM (default: every protected VM)")
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
    p.add_argument("vm", nargs="?", help="only this VM (default: every VM)")
    p.add_argument("recovery_point", nargs="?", help="only this recovery point of VM")
    p.add_argument("--sample", type=float, default=100.0, metavar="PERCENT", help="check a random sample")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check", parents=[json_flag],
                       help="check refs, every referenced block and what killed processes left; exit 4 on problems")
    p.add_argument("--read-data", action="store_true", help="also decode every referenced block and check its digest")
    p.add_argument("--repair", action="store_true",
                   help="rebuild refs from the block maps and remove leftovers (never deletes a block)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("usage", parents=[json_flag], help="protected instance size and backup storage per VM")
    p.set_defaults(func=cmd_usage)

    for name, pinned in (("pin", True), ("unpin", False)):
        p = sub.add_parser(name, parents=[json_flag],
                           help="keep a recovery point whatever the policy says" if pinned
                           else "let the policy prune a pinned recovery point again")
        p.add_argument("vm", help="the VM's name")
        p.add_argument("recovery_point", help="the recovery point's id (rpfs list)")
        p.set_defaults(func=cmd_pin, pinned=pinned)

    p = sub.add_parser("vault", help="vaults: recovery points off the host in an S3 bucket (add, list, remove, push,"
                                     " prune, gc)")
    vaults = p.add_subparsers(dest="vault_action", required=True, metavar="ACTION", parser_class=_Parser)
    v = vaults.add_parser("add", parents=[json_flag],
                          help="name a vault: made from --store (the bucket is created if missing), or, with no"
                               " store, one that a bucket already holds (disaster recovery)")
    v.add_argument("name", help="the vault's name on this machine")
    v.add_argument("--endpoint", required=True, metavar="URL", help="the S3 endpoint, e.g. http://127.0.0.1:7480")
    v.add_argument("--bucket", required=True, help="the bucket (credentials: AWS_* variables or ~/.aws/credentials)")
    v.add_argument("--prefix", help="a key prefix inside the bucket (default: none)")
    v.add_argument("--fingerprint", metavar="XXXX-XXXX-...",
                   help="the store fingerprint kept with your paper or recovery key (rpfs init printed it): a vault"
                        " that shows another is refused")
    vaults.add_parser("list", parents=[json_flag], help="the vaults named on this machine")
    v = vaults.add_parser("remove", parents=[json_flag], help="forget a vault's name (its bucket is untouched)")
    v.add_argument("name", help="the vault's name")
    v = vaults.add_parser("push", parents=[json_flag],
                          help="upload the recovery points newer than each VM's newest in the vault")
    v.add_argument("name", help="the vault's name")
    v.add_argument("vm", nargs="?", help="only this VM's recovery points")
    v.add_argument("recovery_point", nargs="?",
                   help="only this recovery point of VM (also one older than the VM's newest in the vault)")
    v.add_argument("--limit-mbps", type=_rate, default=0.0, metavar="MIB/S",
                   help="limit the upload to this many MiB/s of stored bytes (default: no limit)")
    v.add_argument("--pack-mib", type=int, default=128, help=argparse.SUPPRESS)   # tests: small packs
    v = vaults.add_parser("prune", parents=[json_flag],
                          help="delete the vault's points its policies' vault retention no longer keeps")
    v.add_argument("name", help="the vault's name")
    v.add_argument("vm", nargs="?", help="only this VM")
    v.add_argument("--dry-run", action="store_true", help="list what would be deleted and why the rest is kept")
    v = vaults.add_parser("gc", parents=[json_flag],
                          help="remove packs no manifest needs (in two runs: condemned by one, deleted by the next)")
    v.add_argument("name", help="the vault's name")
    p.set_defaults(func=cmd_vault)

    p = sub.add_parser("instant-daemon")   # started by instant-restore; not for users
    p.add_argument("target")
    p.add_argument("mountpoint")
    p.add_argument("--copy-mbps", type=_rate, default=0.0)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log-file")
    p.add_argument("--key-fd", type=int)
    p.set_defaults(func=cmd_instant_daemon)

    p = sub.add_parser("mount", parents=[json_flag], help="mount the store read-only (FUSE)")
    p.add_argument("mountpoint", help="an empty folder to mount on")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--cache-mb", type=int, default=256, help="decoded-block cache size in MiB (default 256)")
    p.add_argument("--allow-group", metavar="GROUP",
                   help="let this group's members read the images too (default: root only)")
    p.add_argument("--debug", action="store_true", help="log every error in detail")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", parents=[json_flag], help="unmount a store mount (also one whose daemon died)")
    p.add_argument("mountpoint", help="where it is mounted")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("attach", parents=[json_flag],
                       help="mount every filesystem of a disk image, or of every disk of VM[/ID], read-only")
    p.add_argument("source", metavar="IMAGE|VM[/ID]",
                   help="an image file or block device; or a VM of the store, optionally /ID (default: latest)")
    p.add_argument("dest", help="the folder to mount the filesystems on (made if missing)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("detach", parents=[json_flag], help="undo rpfs attach")
    p.add_argument("dest", help="the folder given to rpfs attach")
    p.set_defaults(func=cmd_detach)
    return parser


FROM_VAULT = ("list", "restore", "instant-restore", "instant-stop", "mount", "attach", "verify")   # --vault serves


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()   # here, not at exit: a closed pipe is then one more BrokenPipeError
    except BrokenPipeError:   # `rpfs list | head`: the reader has what it wanted; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's last flush must not fail
        return 141   # what a shell reports for a command ended by SIGPIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    take_passphrases(args)
    try:
        if args.vault and args.command not in FROM_VAULT:
            raise RpfsError(f"--vault: rpfs {args.command} does not read from a vault (from a vault: "
                            + ", ".join(FROM_VAULT) + ")")
        return args.func(args)
    except BrokenPipeError:
        raise   # main's: not an error of the command
    except RpfsError as e:
        print(f"rpfs: {e.message}", file=sys.stderr)
        return e.exit_code
    except PermissionError as e:   # a user who may not: what refused them, whose it is, its mode
        named = isinstance(e.filename, str) and e.filename
        line = permission_denied(e.filename, Path(e.filename)).message if named else "permission denied"
        print(f"rpfs: {line}", file=sys.stderr)
        return 1
    except (OSError, DatabaseError) as e:  # the system said no (permissions, a read-only disk...): one line
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"rpfs: {getattr(e, 'strerror', None) or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        created = getattr(e, "recovery_point", None)
        if args.command != "backup":
            what = "stopped"
        elif created:
            what = f"recovery point {created} was created before the interrupt"
        else:
            what = "no recovery point was created"
        print(f"rpfs: interrupted; {what}", file=sys.stderr)
        return 130
