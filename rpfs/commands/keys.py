"""Commands about a store's keys and what it is: init, info, key list|add|remove|passwd|export|recover.

Which key a command uses: a master key handed down by rpfs itself (--key-fd, to its daemons), else
--key-file PATH or RPFS_KEY_FILE, else a passphrase from RPFS_PASSPHRASE or asked on the terminal.
New passphrases come from RPFS_NEW_PASSPHRASE or are asked twice on the terminal.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rpfs.commands import asked_once, key_choice, open_store, print_json
from rpfs.commands.arguments import Parser
from rpfs.commands.progress import human_bytes
from rpfs.errors import RpfsError
from rpfs.host.known_stores import forget, remember_encrypted
from rpfs.store.blob import DEFAULT_ZSTD_LEVEL
from rpfs.store.key_slots import KeyChoice, KeySlot, NewSlot, key_file_key, paper_text, read_public_key
from rpfs.store.store import DEFAULT_BLOCK_SIZE, ENCRYPTION, Store

MIN_PASSPHRASE = 8


def _new_passphrase(args, variable: str = "RPFS_NEW_PASSPHRASE") -> NewSlot:
    ask = asked_once(args, variable, "new passphrase: ", twice=True)
    if ask is None:
        raise RpfsError(f"give the new passphrase in {variable}, or run this on a terminal")
    passphrase = ask()
    if len(passphrase) < MIN_PASSPHRASE:
        raise RpfsError(f"a passphrase has at least {MIN_PASSPHRASE} characters")
    return NewSlot("passphrase", passphrase)


def _new_key_file(path: str) -> NewSlot:
    """A slot for the key file at path, which is made (0600) if there is none."""
    return NewSlot("key-file", key_file_key(Path(path)), note=os.path.abspath(path))


def _recovery(path: str) -> NewSlot:
    return NewSlot("recovery", read_public_key(Path(path)), note=os.path.abspath(path))


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = t[-1:] if t[-1:].isalpha() else ""
    try:
        return int(t[:len(t) - len(suffix)]) * units[suffix]
    except (ValueError, KeyError):
        raise RpfsError(f"cannot read size {text!r} (examples: 1M, 256K, 1048576)") from None


def cmd_init(args) -> int:
    if not args.store:
        raise RpfsError("no store given: use --store DIR or set RPFS_STORE")
    block_size = parse_size(args.block_size)
    Store.refuse_init(Path(args.store), block_size, args.zstd_level, args.encryption != "none")   # before a key file
    slots = []
    if args.encryption != "none":
        key_file = getattr(args, "key_file", None) or os.environ.get("RPFS_KEY_FILE")
        passphrase = "RPFS_PASSPHRASE" in args.passphrases or (not key_file and sys.stdin.isatty())
        if not key_file and not passphrase:
            raise RpfsError("rpfs init makes an encrypted store: give --key-file PATH (made if missing), a passphrase"
                            " (RPFS_PASSPHRASE, or on a terminal), or --encryption none")
        if args.recovery_public_key:
            slots.append(_recovery(args.recovery_public_key))
        if passphrase:
            slots.append(_new_passphrase(args, "RPFS_PASSPHRASE"))
        if key_file:
            slots.append(_new_key_file(key_file))   # made last: a refused init leaves no new key file
    elif args.recovery_public_key:
        raise RpfsError("--recovery-public-key is for an encrypted store")
    elif key_choice(args).given:
        raise RpfsError("--encryption none makes a store without a key, but a key was given (--key-file,"
                        " RPFS_KEY_FILE or RPFS_PASSPHRASE): give none, or leave out --encryption none")
    with Store.init(Path(args.store), block_size, args.zstd_level, key_slots=slots) as store:
        if store.encrypted:   # what was recorded of an older store at this path is no more
            remember_encrypted(store.path, store.store_id.hex())
        else:
            forget(store.path)
        if args.json:
            print_json(_describe(store))
        else:
            print(f"initialised store {store.path} (block size {human_bytes(store.block_size)},"
                  f" zstd level {store.zstd_level}, {_encryption_line(store)})")
            if store.encrypted:
                print(f"store fingerprint: {store.key_lock().fingerprint}")
                print("keep a copy of the key safe: without a key slot you can open, the backups cannot be read"
                      " (rpfs key export --paper; rpfs key add --recovery-public-key); write the fingerprint down"
                      " with it: a vault recovered without this store must show the same", file=sys.stderr)
    return 0


def _encryption_line(store: Store) -> str:
    if not store.encrypted:
        return "not encrypted"
    kinds = [s.kind for s in store.key_lock().slots]
    return f"encrypted with {store.encryption}, key slots: {', '.join(kinds)}"


def _describe(store: Store) -> dict:
    described = {"store": str(store.path), "format_version": store.format_version, "block_size": store.block_size,
                 "zstd_level": store.zstd_level, "created": store.meta.get("created"),
                 "encryption": store.encryption, "block_id": store.meta.get("block_id", "sha256"),
                 "store_id": store.store_id.hex() or None, "file_bytes": store.stored_bytes()}
    if store.encrypted:
        lock = store.key_lock()
        described["store_fingerprint"] = lock.fingerprint   # as the store says (no key: unchecked)
        described["key_slots"] = [_slot_record(s) for s in lock.slots]
        if lock.damaged:
            described["damaged_key_slots"] = lock.damaged
    return described


def _slot_record(slot) -> dict:
    return {"id": slot.id, "kind": slot.kind, "created": slot.created, "note": slot.note,
            "fingerprint": slot.fingerprint or None}


def cmd_info(args) -> int:
    """What a store is (no key needed): format, encryption, sizes, key slots."""
    with open_store(args, readonly=True, unlock=False) as store:
        described = _describe(store)
    if args.json:
        print_json(described)
        return 0
    for name, value in described.items():
        if name != "key_slots":
            print(f"{name.replace('_', ' '):<15} {value if value is not None else '-'}")
    for slot in described.get("key_slots", []):
        print(f"key slot {slot['id']:<6} {slot['kind']:<11} {slot['created']}  {slot['note']}")
    return 0


def cmd_key(args) -> int:
    return {"list": _key_list, "add": _key_add, "remove": _key_remove, "passwd": _key_passwd,
            "export": _key_export, "recover": _key_recover}[args.key_action](args)


def _key_list(args) -> int:
    with open_store(args, readonly=True, unlock=False) as store:
        if not store.encrypted:
            raise RpfsError(f"store {store.path} is not encrypted: it has no keys")
        slots = [_slot_record(s) for s in store.key_lock().slots]
    if args.json:
        print_json(slots)
    for slot in [] if args.json else slots:
        print(f"{slot['id']:<6} {slot['kind']:<11} {slot['created']}  {slot['note']}")
    return 0


def _check_one_new_slot(args) -> None:
    given = [a for a in ("new_key_file", "new_passphrase", "recovery_public_key") if getattr(args, a, None)]
    if len(given) != 1:
        raise RpfsError("give one of --new-key-file PATH, --new-passphrase or --recovery-public-key FILE")


def _one_new_slot(args) -> NewSlot:
    """The new slot the command names (checked by _check_one_new_slot); made once the store is open, so a
    key that does not open it makes no key file."""
    if args.new_key_file:
        return _new_key_file(args.new_key_file)
    return _new_passphrase(args) if args.new_passphrase else _recovery(args.recovery_public_key)


def _added(args, store: Store, new: NewSlot, replacing: KeySlot | None = None) -> int:
    with _vaults_marked_behind(store) as vaults:
        slot, added = store.add_key_slot(new, replacing)
    fingerprint = store.key_lock().fingerprint
    if args.json:
        print_json({**_slot_record(slot), "added": added, "store_fingerprint": fingerprint,
                    "vaults": _update_vaults(store, vaults, quiet=True)})
        return 0
    done = "already opens" if not added else "changed" if replacing else "added"
    print(f"{done} key slot {slot.id} ({slot.kind}{', ' + slot.note if slot.note else ''})")
    if slot.kind == "recovery":
        print(f"store fingerprint: {fingerprint} (keep it with the recovery private key: a vault recovered with"
              " that key must show the same; rpfs vault add --fingerprint checks it)")
    _update_vaults(store, vaults)
    return 0


@contextmanager
def _vaults_marked_behind(store: Store) -> Iterator[list]:
    """The vaults of the store named on this machine, marked behind in the vault list while its key slots
    change: a command killed between the change and the upload leaves them marked (vault/keys.py); a change
    refused unmarks those it marked."""
    from rpfs.vault.config import vaults
    mine = [c for c in vaults().values() if c.store_id == store.store_id.hex()]
    if not mine:
        yield mine
        return
    from rpfs.vault.keys import mark_behind, sent_key_slots
    marked = mark_behind(mine)
    try:
        yield mine
    except BaseException:
        for config in marked:
            sent_key_slots(config)   # nothing changed: as in step as before
        raise


def _update_vaults(store: Store, vaults: list, quiet: bool = False) -> dict[str, str]:
    """Send the store's key slots, as they are now, to each of its vaults: a removed slot must stop opening
    the vaults too. A vault that cannot be reached stays marked behind and is named; the next command that
    reaches it with the store (push, prune, rpfs run) updates it first. Returns vault name -> "updated" or
    why not."""
    if not vaults:
        return {}
    from rpfs.vault.keys import send_key_slots
    results = {}
    for config in vaults:
        error = send_key_slots(config, store)
        results[config.name] = error or "updated"
        if quiet:
            continue
        if error is None:
            print(f"vault {config.name}: its key slots updated")
        else:
            print(f"vault {config.name} was not updated ({error}): it still holds the old key slots, so a removed"
                  f" key still opens it, until the next rpfs vault push {config.name} (or rpfs run) reaches it",
                  file=sys.stderr)
    return results


def _key_add(args) -> int:
    _check_one_new_slot(args)
    with open_store(args) as store:
        return _added(args, store, _one_new_slot(args))


def _key_remove(args) -> int:
    with open_store(args) as store:
        with _vaults_marked_behind(store) as vaults:
            slot = store.remove_key_slot(args.slot)
        if args.json:
            print_json({**_slot_record(slot), "vaults": _update_vaults(store, vaults, quiet=True)})
            return 0
        print(f"removed key slot {slot.id} ({slot.kind}); no data was rewritten")
        _update_vaults(store, vaults)
    print(WIPE_HINT, file=sys.stderr)
    return 0


WIPE_HINT = ("the old slot's bytes stay in the store file's free pages until they are reused: rpfs compact wipes"
             " them (with no mount open); copies of the store made before still hold the old slot")


def _key_passwd(args) -> int:
    with open_store(args) as store:
        passphrase_slots = store.key_lock().of_kind("passphrase")
        opened = key_choice(args).opened
        if args.slot is not None:
            chosen = [s for s in passphrase_slots if s.id == args.slot]
        elif opened is not None and opened.kind == "passphrase":
            chosen = [opened]
        else:
            chosen = passphrase_slots if len(passphrase_slots) == 1 else []
        if not chosen:
            raise RpfsError("name the passphrase slot to change (rpfs key list), e.g. rpfs key passwd 1")
        done = _added(args, store, _new_passphrase(args), replacing=chosen[0])
    if not args.json:
        print(WIPE_HINT, file=sys.stderr)
    return done


def _key_export(args) -> int:
    with open_store(args, readonly=True) as store:
        if not store.encrypted:
            raise RpfsError(f"store {store.path} is not encrypted: it has no key to export")
        text = paper_text(store.master_key, store.path, store.store_id, store.key_lock().fingerprint)
    if args.json:
        print_json({"store": str(store.path), "paper": text})
    else:
        sys.stdout.write(text)
    return 0


def _key_recover(args) -> int:
    """Open the store with the recovery private key or the paper key, and add a new way in."""
    if bool(args.private_key) == bool(args.paper):
        raise RpfsError("give one of --private-key FILE or --paper FILE ('-': standard input)")
    _check_one_new_slot(args)
    if args.private_key:
        args._key_choice = KeyChoice(private_key_file=args.private_key)
    else:
        paper = sys.stdin.read() if args.paper == "-" else _read_text(args.paper)
        args._key_choice = KeyChoice(paper=paper)
    with open_store(args) as store:
        return _added(args, store, _one_new_slot(args))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as e:
        raise RpfsError(f"cannot read {path}: {e.strerror}") from None


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of init, info and key; parents give every command --json and --key-file."""
    p = sub.add_parser("init", parents=parents, help="create a store")
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

    p = sub.add_parser("info", parents=parents,
                       help="what a store is: format, encryption, key slots (no key needed)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("key", help="the keys of an encrypted store: list, add, remove, passwd, export, recover")
    keys = p.add_subparsers(dest="key_action", required=True, metavar="ACTION", parser_class=Parser)
    keys.add_parser("list", parents=parents, help="the key slots (no key needed)")
    new_slot = Parser(add_help=False)
    new_slot.add_argument("--new-key-file", metavar="PATH", help="a key file (made, mode 0600, if missing)")
    new_slot.add_argument("--new-passphrase", action="store_true",
                          help="a passphrase ($RPFS_NEW_PASSPHRASE, or asked twice on the terminal)")
    k = keys.add_parser("add", parents=[*parents, new_slot], help="add a key slot (opened with a key you have)")
    k.add_argument("--recovery-public-key", metavar="FILE",
                   help="a recovery slot for this X25519 public key (PEM); keep its private key offline")
    k = keys.add_parser("remove", parents=parents, help="remove a key slot (never the last one)")
    k.add_argument("slot", help="the slot id (rpfs key list)")
    k = keys.add_parser("passwd", parents=parents, help="change a passphrase (its slot, nothing else)")
    k.add_argument("slot", nargs="?", help="the passphrase slot (default: the one your passphrase opens)")
    k = keys.add_parser("export", parents=parents, help="print the master key (to print on paper and lock away)")
    k.add_argument("--paper", action="store_true", required=True, help="as text with a checksum, to type back in")
    k = keys.add_parser("recover", parents=[*parents, new_slot],
                        help="add a key file or passphrase, opening the store with the recovery private key or paper")
    k.add_argument("--private-key", metavar="FILE", help="the recovery private key (X25519, PEM)")
    k.add_argument("--paper", metavar="FILE", help="the paper key as typed back in ('-': standard input)")
    k.set_defaults(recovery_public_key=None)
    p.set_defaults(func=cmd_key)
