"""`rpfs vault`: name a vault (add, list, remove) and push recovery points to it.

boto3 takes half a second to import: only commands that talk to a vault import rpfs.vault.vault.
"""
from __future__ import annotations

import argparse
import sys

from rpfs.commands import key_choice, open_store, print_json
from rpfs.commands.arguments import Parser, rate
from rpfs.commands.progress import ProgressBar, human_bytes
from rpfs.errors import RpfsError
from rpfs.store.key_slots import KeyChoice, same_fingerprint, store_fingerprint
from rpfs.upkeep.jobs import recorded
from rpfs.vault import config as vault_configs
from rpfs.vault.config import VaultConfig, checked, vault_config


def cmd_vault(args) -> int:
    return {"add": _add, "list": _list, "remove": _remove, "push": _push, "prune": _prune,
            "gc": _gc}[args.vault_action](args)


def _add(args) -> int:
    from rpfs.vault.vault import Vault, probe
    config = checked(VaultConfig(args.name, args.endpoint, args.bucket, args.prefix or ""))
    if args.name in vault_configs.vaults():
        raise RpfsError(f"vault {args.name!r} exists already (rpfs vault list; rpfs vault remove {args.name} first"
                        " to point the name elsewhere)")
    if args.store:   # made from the store (or this store's vault adopted)
        with open_store(args, readonly=True) as store:
            if args.fingerprint and store.encrypted and not same_fingerprint(args.fingerprint,
                                                                             store.key_lock().fingerprint):
                raise RpfsError(f"store {args.store} has the fingerprint {store.key_lock().fingerprint}, not"
                                f" {args.fingerprint}; nothing was added")
            vault = Vault.create(config, store)
        settings = vault.settings
        what = f"made from store {args.store}" if vault.created else f"holding the vault of store {args.store}"
    else:   # disaster recovery: the bucket must hold a vault; its key is asked when it is read
        settings = probe(config)
        what = (f"holding the vault of store id {settings['store_id']}, made {settings['created']}")
    fingerprint = _fingerprint(settings)
    if args.fingerprint and not same_fingerprint(args.fingerprint, fingerprint):
        raise RpfsError(f"{config.label}: bucket {config.bucket} holds a vault whose store fingerprint is"
                        f" {fingerprint}, not {args.fingerprint}: it is not the vault of your store (replaced or"
                        " forged?); nothing was added")
    if not args.store and not args.fingerprint:
        what += (f"; store fingerprint {fingerprint}: compare it with the one kept with your paper key or recovery"
                 f" key (or give it with --fingerprint) before you trust it; then: rpfs --vault {args.name} list")
    elif not args.store:
        what += f"; store fingerprint {fingerprint} matches; then: rpfs --vault {args.name} list"
    config.store_id, config.key_check = settings["store_id"], settings["key_check"]
    vault_configs.save(config)
    if args.json:
        print_json({"name": config.name, "endpoint": config.endpoint, "bucket": config.bucket,
                    "prefix": config.prefix, "store_id": config.store_id, "store_fingerprint": fingerprint})
    else:
        print(f"vault {config.name}: bucket {config.bucket} at {config.endpoint}, {what}")
    return 0


def _fingerprint(settings: dict) -> str:
    """The store fingerprint a vault's format record shows (each unlock checks its key check: key_slots)."""
    try:
        return store_fingerprint(bytes.fromhex(settings["store_id"]), bytes.fromhex(settings["key_check"]))
    except (ValueError, KeyError, TypeError):
        raise RpfsError("the vault's format record has no readable store id or key check (damaged)") from None


def _list(args) -> int:
    found = vault_configs.vaults()
    if args.json:
        print_json([{"name": c.name, "endpoint": c.endpoint, "bucket": c.bucket, "prefix": c.prefix}
                    for c in found.values()])
    elif not found:
        print("no vaults (rpfs vault add NAME --endpoint URL --bucket BUCKET)")
    for c in found.values() if not args.json else ():
        print(f"{c.name:<16} {c.endpoint}  bucket {c.bucket}" + (f"  prefix {c.prefix}" if c.prefix else ""))
    return 0


def _remove(args) -> int:
    from rpfs.vault.index_cache import IndexCache
    config = vault_config(args.name)
    vault_configs.remove(args.name)
    IndexCache(config).drop()
    if not args.json:
        print(f"vault {args.name} forgotten on this machine (its bucket and what it holds are untouched)")
    return 0


def _push(args) -> int:
    from rpfs.vault.named import open_vault
    from rpfs.vault.push import push
    with open_store(args) as store:   # writable: the push is recorded as a job
        # opened with the store's master key, not the command's: after a key change the vault missed (its
        # slots behind), the new key file or passphrase opens no slot there, and this push must send them
        vault = open_vault(args.name, KeyChoice(master=store.master_key))
        points = store.points(args.vm) if args.recovery_point is None else [store.point(args.vm, args.recovery_point)]
        if args.vm and not points:
            store.point(args.vm)   # raises: unknown VM
        with recorded(store, "push", args.vm) as job, ProgressBar(f"push to {args.name}", quiet=args.json) as bar:
            summary = push(store, vault, points, progress=bar, bytes_per_second=args.limit_mbps * (1 << 20),
                           pack_bytes=args.pack_mib << 20, named=args.recovery_point is not None)
            job.bytes_written = summary.uploaded_bytes
            job.recovery_point = summary.pushed[-1] if summary.pushed else None
    if args.json:
        print_json({**summary.__dict__, "vault": args.name, "mib_per_second": round(summary.mib_per_second, 1)})
        return 0
    print(f"pushed {len(summary.pushed)} recovery point(s) to vault {args.name}"
          f" ({len(summary.already)} there already, or older than its newest):"
          f" {human_bytes(summary.uploaded_bytes)} stored bytes uploaded in {summary.packs} pack(s),"
          f" {summary.blobs} block(s), {summary.seconds:.1f} s ({summary.mib_per_second:.0f} MiB/s)"
          + (f", {len(summary.catalogs)} catalog(s)" if summary.catalogs else ""))
    for note in summary.notes:
        print(f"rpfs: note: {note}", file=sys.stderr)
    return 0


def _gc(args) -> int:
    from rpfs.vault.gc import gc
    from rpfs.vault.named import open_vault
    with open_vault(args.name, key_choice(args)) as vault:
        summary = gc(vault)
    if args.json:
        print_json({**summary.__dict__, "vault": args.name})
        return 0
    print(f"vault {args.name}: deleted {summary.deleted_packs} pack(s) ({human_bytes(summary.deleted_bytes)}) that"
          f" the last gc condemned, {summary.rescued_packs} rescued (a manifest needs them); condemned"
          f" {summary.condemned_packs} pack(s) for the next gc"
          + (f", of which {summary.repacked_packs} half-empty ({human_bytes(summary.repacked_bytes)} still needed"
             " copied into new packs)" if summary.repacked_packs else "")
          + (f"; removed {summary.removed_catalogs} catalog(s) of pruned points" if summary.removed_catalogs else ""))
    for holder in summary.waiting_for:
        print(f"  kept for now: the packs condemned before are waited on by {holder}")
    for holder in summary.removed_locks:
        print(f"  removed the lock of {holder} (its process is gone)")
    return 0


def _prune(args) -> int:
    from rpfs.policy.offsite import prune_vault, vault_retentions
    from rpfs.policy.protection import get_policy, protections
    from rpfs.vault.named import open_vault
    with open_store(args, readonly=args.dry_run) as store:
        policies = {vm: get_policy(store, p.policy) for vm, p in protections(store).items()}
        retentions = vault_retentions(store, policies).get(args.name, {})
        with open_vault(args.name, KeyChoice(master=store.master_key), slots_from=store) as vault:
            results = prune_vault(vault, retentions, args.vm, dry_run=args.dry_run)
    if args.json:
        print_json([r.__dict__ for r in results])
        return 0
    if not results:
        print(f"no policy keeps a vault retention for vault {args.name}: it keeps every point")
    for r in results:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{r.vm}: {verb} {', '.join(r.pruned) or 'nothing'} in vault {args.name}; kept "
              + ", ".join(f"{point_id} ({why})" for point_id, why in sorted(r.kept.items())))
    if not args.dry_run and any(r.pruned for r in results):
        print(f"(rpfs vault gc {args.name}, run twice, frees the space)")
    return 0


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of vault; parents give every command --json and --key-file."""
    p = sub.add_parser("vault", help="vaults: recovery points off the host in an S3 bucket (add, list, remove, push,"
                                     " prune, gc)")
    vaults = p.add_subparsers(dest="vault_action", required=True, metavar="ACTION", parser_class=Parser)
    v = vaults.add_parser("add", parents=parents,
                          help="name a vault: made from --store (the bucket is created if missing), or, with no"
                               " store, one that a bucket already holds (disaster recovery)")
    v.add_argument("name", help="the vault's name on this machine")
    v.add_argument("--endpoint", required=True, metavar="URL", help="the S3 endpoint, e.g. http://127.0.0.1:7480")
    v.add_argument("--bucket", required=True, help="the bucket (credentials: AWS_* variables or ~/.aws/credentials)")
    v.add_argument("--prefix", help="a key prefix inside the bucket (default: none)")
    v.add_argument("--fingerprint", metavar="XXXX-XXXX-...",
                   help="the store fingerprint kept with your paper or recovery key (rpfs init printed it): a vault"
                        " that shows another is refused")
    vaults.add_parser("list", parents=parents, help="the vaults named on this machine")
    v = vaults.add_parser("remove", parents=parents, help="forget a vault's name (its bucket is untouched)")
    v.add_argument("name", help="the vault's name")
    v = vaults.add_parser("push", parents=parents,
                          help="upload the recovery points newer than each VM's newest in the vault")
    v.add_argument("name", help="the vault's name")
    v.add_argument("vm", nargs="?", help="only this VM's recovery points")
    v.add_argument("recovery_point", nargs="?",
                   help="only this recovery point of VM (also one older than the VM's newest in the vault)")
    v.add_argument("--limit-mbps", type=rate, default=0.0, metavar="MIB/S",
                   help="limit the upload to this many MiB/s of stored bytes (default: no limit)")
    v.add_argument("--pack-mib", type=int, default=128, help=argparse.SUPPRESS)   # tests: small packs
    v = vaults.add_parser("prune", parents=parents,
                          help="delete the vault's points its policies' vault retention no longer keeps")
    v.add_argument("name", help="the vault's name")
    v.add_argument("vm", nargs="?", help="only this VM")
    v.add_argument("--dry-run", action="store_true", help="list what would be deleted and why the rest is kept")
    v = vaults.add_parser("gc", parents=parents,
                          help="remove packs no manifest needs (in two runs: condemned by one, deleted by the next)")
    v.add_argument("name", help="the vault's name")
    p.set_defaults(func=cmd_vault)
