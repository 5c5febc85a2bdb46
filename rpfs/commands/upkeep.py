"""Commands that keep a store healthy: gc, compact, verify, usage, pin/unpin, prune."""
from __future__ import annotations

import argparse
from dataclasses import asdict

from rpfs.commands import open_store, print_json, store_and_job
from rpfs.commands.progress import ProgressBar, human_bytes
from rpfs.errors import EXIT_OK, EXIT_PROBLEMS_FOUND
from rpfs.store.leases import set_pinned
from rpfs.upkeep.jobs import recorded


def cmd_gc(args) -> int:
    from rpfs.upkeep.gc import gc
    with open_store(args) as store, recorded(store, "gc") as job:
        result = gc(store)
        job.bytes_written = result.freed_bytes
    if args.json:
        print_json(asdict(result))
    else:
        print(f"removed {result.removed_blocks} unreferenced block(s), {human_bytes(result.freed_bytes)}"
              " (LMDB reuses the space; rpfs compact shrinks the file)")
    return 0


def cmd_compact(args) -> int:
    from rpfs.upkeep.compact import compact
    with open_store(args) as store:
        before, after = compact(store)
    if args.json:
        print_json({"before_bytes": before, "after_bytes": after})
    else:
        print(f"compacted {args.store}: {human_bytes(before)} -> {human_bytes(after)}")
    return 0


def cmd_verify(args) -> int:
    from rpfs.upkeep.verify import verify
    with store_and_job(args, "verify", args.vm) as (store, job):
        if args.vm:
            store.point(args.vm, args.recovery_point)   # raises for an unknown VM or point: no job
        job.begin()
        with ProgressBar("verify", quiet=args.json) as bar:
            result = verify(store, args.vm, args.recovery_point, args.sample, progress=bar)
        job.bytes_read = result.checked_bytes
        if result.damaged:
            job.error = f"{len(result.damaged)} damaged recovery point(s)"
    if args.json:
        print_json(asdict(result))
    else:
        print(f"checked {result.checked_blocks} block(s), {human_bytes(result.checked_bytes)}"
              f"{f' ({args.sample:g}% sample)' if args.sample < 100 else ''}")
        for point, problems in result.damaged.items():
            print(f"DAMAGED {point}: {len(problems)} bad block reference(s); first: {problems[0]}")
    return EXIT_PROBLEMS_FOUND if result.damaged else EXIT_OK


def cmd_check(args) -> int:
    from rpfs.upkeep.check import check
    with open_store(args) as store, recorded(store, "check") as job:
        with ProgressBar("check", quiet=args.json) as bar:
            result = check(store, read_data=args.read_data, repair=args.repair, progress=bar)
        if result.unrepaired:
            job.error = f"{len(result.unrepaired)} problem(s)"
    if args.json:
        print_json({"recovery_points": result.recovery_points, "checked_blocks": result.checked_blocks,
                    "problems": [{"kind": p.kind, "what": p.what, "repaired": p.repaired} for p in result.problems]})
    else:
        for p in result.problems:
            print(f"{'repaired' if p.repaired else 'PROBLEM'} {p.kind}: {p.what}")
        print(f"checked {result.recovery_points} recovery point(s), {result.checked_blocks} block(s)"
              f"{' (content read and hashed)' if args.read_data else ' (frames and CRCs)'}: "
              + (f"{len(result.unrepaired)} problem(s)" if result.unrepaired else "no problem left"))
    return EXIT_PROBLEMS_FOUND if result.unrepaired else EXIT_OK


def cmd_usage(args) -> int:
    from rpfs.upkeep.usage import usage
    with open_store(args, readonly=True) as store:
        result = usage(store)
    if args.json:
        print_json({**asdict(result), "deduplication_ratio": round(result.deduplication_ratio, 3),
                     "compression_ratio": round(result.compression_ratio, 3)})
        return 0
    print(f"{'VM':<16} {'points':>6} {'protected instance':>19} {'backup storage':>15} {'snapshots':>10}")
    for v in result.vms:
        print(f"{v.vm:<16} {v.recovery_points:>6} {human_bytes(v.protected_instance_bytes):>19}"
              f" {human_bytes(v.backup_storage_bytes):>15} {human_bytes(v.snapshot_bytes):>10}")
    print(f"store: {human_bytes(result.stored_bytes)} stored, catalogs {human_bytes(result.catalog_bytes)}"
          f" ({human_bytes(result.file_bytes)} file), "
          f"deduplication {result.deduplication_ratio:.2f}x, compression {result.compression_ratio:.2f}x; "
          f"{result.unreferenced_blocks} unreferenced block(s) for gc. Shared blocks: {result.attribution}.")
    return 0


def cmd_pin(args) -> int:
    with open_store(args) as store:
        found = store.point(args.vm, args.recovery_point)
        point = set_pinned(store, found.vm, found.id, args.pinned)
    if args.json:
        print_json({"vm": point.vm, "recovery_point": point.id, "pinned": point.pinned})
    else:
        print(f"{point.vm}/{point.id} {'pinned: prune keeps it' if point.pinned else 'unpinned'}")
    return 0


def cmd_prune(args) -> int:
    from rpfs.policy.protection import retentions
    from rpfs.policy.prune import prune
    with open_store(args) as store:
        policies = retentions(store)
        if args.dry_run:
            results = prune(store, policies, args.vm, dry_run=True)
        else:
            with recorded(store, "prune", args.vm) as job:
                results = prune(store, policies, args.vm)
                job.bytes_written = sum(len(r.pruned) for r in results)
    if args.json:
        print_json([asdict(r) for r in results])
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


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The parsers of prune, gc, compact, verify, check, usage, pin and unpin; parents give every command --json and --key-file."""
    p = sub.add_parser("prune", parents=parents, help="delete recovery points the policies no longer keep")
    p.add_argument("vm", nargs="?", help="only this VM (default: every protected VM)")
    p.add_argument("--dry-run", action="store_true", help="list what would be pruned and why the rest is kept")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("gc", parents=parents, help="remove blocks no recovery point references")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("compact", parents=parents, help="rewrite the store file compacted (no mounts may be open)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("verify", parents=parents, help="read every referenced block and check its digest")
    p.add_argument("vm", nargs="?", help="only this VM (default: every VM)")
    p.add_argument("recovery_point", nargs="?", help="only this recovery point of VM")
    p.add_argument("--sample", type=float, default=100.0, metavar="PERCENT", help="check a random sample")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check", parents=parents,
                       help="check refs, every referenced block, the catalogs and what killed processes left;"
                            " exit 4 on problems")
    p.add_argument("--read-data", action="store_true", help="also decode every referenced block and check its digest")
    p.add_argument("--repair", action="store_true",
                   help="rebuild refs and the catalogs' counts, remove a damaged catalog (rpfs catalog makes it"
                        " anew) and leftovers (never deletes a block)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("usage", parents=parents, help="protected instance size and backup storage per VM")
    p.set_defaults(func=cmd_usage)

    for name, pinned in (("pin", True), ("unpin", False)):
        p = sub.add_parser(name, parents=parents,
                           help="keep a recovery point whatever the policy says" if pinned
                           else "let the policy prune a pinned recovery point again")
        p.add_argument("vm", help="the VM's name")
        p.add_argument("recovery_point", help="the recovery point's id (rpfs list)")
        p.set_defaults(func=cmd_pin, pinned=pinned)
