"""One module per group of `rpfs` subcommands; each command is a small function taking the parsed args, and
each module's add_parsers adds its commands' parsers (rpfs/cli.py calls them; arguments.py: what they share).

User mistakes raise RpfsError and end as one line on stderr (rpfs/cli.py); only bugs print a traceback.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rpfs.errors import RpfsError
from rpfs.host.known_stores import config_folder, remember_encrypted, was_encrypted
from rpfs.host.libc import erase_environment_value, no_core_dumps
from rpfs.store.key_slots import KeyChoice
from rpfs.store.source import RecoverySource
from rpfs.store.store import Store


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


PASSPHRASE_VARIABLES = ("RPFS_PASSPHRASE", "RPFS_NEW_PASSPHRASE")


def take_passphrases(args) -> None:
    """Move the passphrases out of the environment into args: no process rpfs starts (daemons, readers,
    pre/post scripts, qemu) inherits them, and /proc/PID/environ no longer shows them (docs/manual/encryption.md:
    what remains). A process given one dumps no core."""
    args.passphrases = {}
    for name in PASSPHRASE_VARIABLES:
        if name in os.environ:
            no_core_dumps()
            args.passphrases[name] = os.fsencode(os.environ[name])
            erase_environment_value(name)   # the copy the kernel shows; pop only unsets it
            os.environ.pop(name)


def open_store(args, readonly: bool = False, unlock: bool = True) -> Store:
    """The store of --store, unlocked with the key the command was given when it is encrypted (a key given
    to a store that says it is not encrypted is refused by Store.open). A store that says so while a vault
    of this machine recorded it as encrypted is refused too: its settings were changed behind our back."""
    store = Store.open(args.store, readonly=readonly, keys=key_choice(args), unlock=unlock)
    if store.encrypted and store.keyring is not None:
        remember_encrypted(store.path, store.store_id.hex())
    elif not store.encrypted:
        try:
            _refuse_if_known_encrypted(store)
        except BaseException:
            store.close()
            raise
    return store


def _refuse_if_known_encrypted(store: Store) -> None:
    """A store that says it is not encrypted where this machine opened an encrypted one, or that a vault
    here recorded as encrypted, had its settings changed behind our back (host/known_stores.py)."""
    if was_encrypted(store.path):
        raise RpfsError(f"store {store.path} says it is not encrypted, but this machine opened it encrypted before"
                        f" ({config_folder() / 'encrypted-stores.json'}): its settings were changed; it is not"
                        " opened (rpfs init of a new store there clears the record)")
    from rpfs.vault.config import vaults
    for config in vaults().values():
        if store.store_id and config.store_id == store.store_id.hex() and config.key_check:
            raise RpfsError(f"store {store.path} says it is not encrypted, but vault {config.name} recorded it as"
                            " encrypted when it was added: its settings were changed; it is not opened")


def open_source(args) -> RecoverySource:
    """The vault of --vault, else the store, opened to read (and unlocked)."""
    if args.vault:
        return vault_of(args)
    return open_store(args, readonly=True)


def vault_of(args):
    """The vault of --vault, unlocked with the key the command was given (the store's key: same slots);
    a warning first if its key slots are behind the store's."""
    from rpfs.vault.named import open_vault   # boto3: imported only by commands that talk to a vault
    return open_vault(args.vault, key_choice(args), warn=lambda warning: print(warning, file=sys.stderr))


@contextmanager
def store_and_job(args, kind: str, vm: str | None) -> Iterator[tuple]:
    """The store, with the command recorded as a job in it once it calls job.begin() (jobs.py: a refused
    command is no job); or with --vault the vault (rpfs.vault), the job recorded nowhere (the vault keeps
    no jobs, and there may be no store)."""
    from rpfs.upkeep.jobs import Job, recorded
    if args.vault:
        with vault_of(args) as vault:
            yield vault, Job(id="", kind=kind, vm=vm, start="")
        return
    with open_store(args) as store, recorded(store, kind, vm, begun=False) as job:
        yield store, job


def key_choice(args) -> KeyChoice:
    """The key the command was given; read once per command (a handed-down key can be read only once)."""
    cached = getattr(args, "_key_choice", None)
    if cached is not None:
        return cached
    key_fd = getattr(args, "key_fd", None)
    if key_fd is not None:
        no_core_dumps()   # a daemon, about to read the master key
        with os.fdopen(key_fd, "rb") as pipe:
            choice = KeyChoice(master=pipe.read(64))
    else:
        choice = KeyChoice(key_file=getattr(args, "key_file", None) or os.environ.get("RPFS_KEY_FILE"),
                           passphrase=asked_once(args, "RPFS_PASSPHRASE", "passphrase of the store: "),
                           private_key_file=getattr(args, "recovery_key", None),
                           passphrase_given="RPFS_PASSPHRASE" in getattr(args, "passphrases", {}))
    args._key_choice = choice
    return choice


def asked_once(args, variable: str, prompt: str, twice: bool = False):
    """A function giving the passphrase from the environment (taken by take_passphrases), or asked on the
    terminal (once); None when there is neither."""
    given = getattr(args, "passphrases", {}).get(variable)
    if given is not None:
        return lambda: given
    if not sys.stdin.isatty():
        return None
    answer: list[bytes] = []

    def ask() -> bytes:
        if not answer:
            first = getpass.getpass(prompt)
            if twice and getpass.getpass("the same again: ") != first:
                raise RpfsError("the two passphrases differ; nothing was changed")
            answer.append(first.encode())
        return answer[0]
    return ask

