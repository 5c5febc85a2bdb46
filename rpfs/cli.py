"""The `rpfs` command: the global options, and the one place where errors become a line on stderr.

The subcommands live in rpfs/commands/, one small function each; each module there adds its commands' parsers
(add_parsers), beside their code.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rpfs.commands import backups, files, keys, mounts, protecting, restores, take_passphrases, upkeep, vaults
from rpfs.commands.arguments import Parser
from rpfs.errors import EXIT_CLOSED_PIPE, EXIT_INTERRUPTED, EXIT_USER_ERROR, RpfsError
from rpfs.host.access import permission_denied
from rpfs.store.store import DatabaseError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("rpfs")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rpfs", description="Recovery-point filesystem: back up disk images, mount and restore them.")
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    json_flag = Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print machine-readable JSON")
    json_flag.add_argument("--key-file", metavar="PATH", default=argparse.SUPPRESS, help=key_help)
    json_flag.add_argument("--key-fd", type=int, help=argparse.SUPPRESS)   # a master key from rpfs itself

    for commands in (keys, backups, files, restores, protecting, upkeep, vaults, mounts):
        commands.add_parsers(sub, [json_flag])
    return parser


FROM_VAULT = ("list", "restore", "instant-restore", "instant-stop", "mount", "attach", "verify", "find", "ls", "diff",
              "restore-files")   # --vault serves


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()   # here, not at exit: a closed pipe is then one more BrokenPipeError
    except BrokenPipeError:   # `rpfs list | head`: the reader has what it wanted; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's last flush must not fail
        return EXIT_CLOSED_PIPE


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
        return EXIT_USER_ERROR
    except (OSError, DatabaseError) as e:  # the system said no (permissions, a read-only disk...): one line
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"rpfs: {getattr(e, 'strerror', None) or e}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        created = getattr(e, "recovery_point", None)
        if args.command != "backup":
            what = "stopped"
        elif created:
            what = f"recovery point {created} was created before the interrupt"
        else:
            what = "no recovery point was created"
        print(f"rpfs: interrupted; {what}", file=sys.stderr)
        return EXIT_INTERRUPTED
