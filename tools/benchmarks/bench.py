"""tools/bench: runs the rpfs steps (bench_lib.py), then its peers' (bench_peers.py), and reports both.

bench_peers builds on bench_lib; this module, on top of both, is the only one that knows the two.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import bench_catalog
import bench_lib
import bench_peers
import bench_vm
from bench_lib import (REPO, BenchError, Conditions, Context, check_daemon_logs, leftovers, remove_dir,
                       results_json, source_image, step_backup, step_copy, step_read, step_restore, sweep)


def interrupt(*_) -> None:
    raise KeyboardInterrupt


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench", description=bench_lib.__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=1.5, help="source image size (default 1.5)")
    p.add_argument("--cache-dir", type=Path, default=Path("/var/tmp/rpfs-bench"),
                   help="where the generated image is kept, and the stores live during the run")
    p.add_argument("--regenerate", action="store_true", help="rebuild the cached source image")
    p.add_argument("--repeat", type=int, default=1, help="run each timed step N times, report the best")
    p.add_argument("--no-warm", action="store_true", help="do not touch memory before each timed step")
    p.add_argument("--warm-gib", type=float, default=3.0, help="memory to touch before each step (default 3)")
    p.add_argument("--cache-mb", type=int, default=256, help="rpfs mount --cache-mb (default 256)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="leave out restic, borg and bindfs (installed from Debian on first use otherwise)")
    p.add_argument("--tracking-size-gib", type=float, default=4.0,
                   help="image of the change-tracking target (1%% changed; default 4; 0: leave it out)")
    p.add_argument("--fio-seconds", type=int, default=15, help="each fio random-read run (default 15)")
    p.add_argument("--no-vault", dest="vault", action="store_false",
                   help="leave out the vault's figures (tools/bench-vault: push and restore against the Ceph"
                        " gateway of tools/ceph, started and stopped for it)")
    p.add_argument("--vm", action="store_true",
                   help="also the VM rows (tools/benchmarks/bench_vm.py): full and incremental backup of a running"
                        " libvirt domain, 4 GiB qcow2 disk, 1%% changed; needs libvirtd (tools/libvirt start)")
    p.add_argument("--vm-only", action="store_true", help="only the VM rows (implies --vm)")
    p.add_argument("--catalog", action="store_true",
                   help="also the catalog's targets of issue 26 (tools/benchmarks/bench_catalog.py): its cost on the"
                        " image, after 1%% changed and on an unchanged disk; find and ls across many points, next to"
                        " restic's")
    p.add_argument("--only", choices=["catalog"], help="only this section (catalog: implies --catalog)")
    p.add_argument("--catalog-points", type=int, default=100,
                   help="points of the many-files filesystem that find searches (default 100; 0: leave it out)")
    p.add_argument("--catalog-files", type=int, default=100_000,
                   help="files of that filesystem, 20 a folder (default 100,000; its image is kept in --cache-dir)")
    args = p.parse_args(argv)
    args.vm = args.vm or args.vm_only
    args.catalog = args.catalog or args.only == "catalog"
    if args.catalog_points < 0 or args.catalog_files < bench_catalog.FOLDER_FILES:
        p.error(f"--catalog-points must be at least 0 and --catalog-files at least {bench_catalog.FOLDER_FILES}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.fio_seconds < 1:
        p.error("--fio-seconds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (drop_caches, loop devices and mounts need it)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, interrupt)   # unwind through the finally clauses, as for Ctrl-C
    if args.vm_only:
        return vm_main(args)
    if args.only == "catalog":
        return catalog_main(args)
    ctx: Context | None = None
    roots: list[Path] = []
    image: Path | None = None
    code = 0
    with ExitStack() as stack:
        try:
            image, about = source_image(args.cache_dir, args.size_gib, args.regenerate)
            work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
            stack.callback(remove_dir, work)
            scratch = Path(tempfile.mkdtemp(prefix="rpfs-bench-", dir="/dev/shm"))
            stack.callback(remove_dir, scratch)
            roots = [work, scratch]
            os.environ["RPFS_RUN_DIR"] = str(work / "run")   # daemon pid files and logs: ours, removed with work
            os.environ["RPFS_KEY_FILE"] = str(work / "key")  # the encrypted stores' key file (made by rpfs init)
            ctx = Context(image, image.stat().st_size, work, scratch,
                          Conditions(0 if args.no_warm else args.warm_gib), args.repeat, args.cache_mb, about,
                          cache_dir=args.cache_dir, peers=args.peers, tracking_gib=args.tracking_size_gib,
                          fio_seconds=args.fio_seconds)
            run_steps(ctx)
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
            if ctx is not None:
                ctx.problems.append(f"stopped early: {e}")
            code = 1
        except KeyboardInterrupt:
            print("bench: interrupted; cleaning up", file=sys.stderr)
            ctx, code = None, 130
        finally:   # also after a bug in the bench: nothing may stay mounted
            code = finish_cleanup(roots, image, stack) or code
    if ctx is not None:
        print_report(ctx)
        vault = vault_figures(args.size_gib) if args.vault and code == 0 else None
        if vault is None and args.vault and code == 0:
            ctx.problems.append("tools/bench-vault failed (its output is above)")
        vm = vm_figures(args) if args.vm and code == 0 else None
        if vm is None and args.vm and code == 0:
            ctx.problems.append("the VM rows failed (the reason is above)")
        catalog = None
        if args.catalog and code == 0:
            code, catalog = catalog_figures(args)
            if catalog is None:
                ctx.problems.append("the catalog rows failed (the reason is above)")
        if args.json:
            args.json.write_text(json.dumps({**results_json(ctx), "vault": vault, "vm": vm, "catalog": catalog},
                                            indent=2,
                                            default=str) + "\n")
            print(f"bench: figures written to {args.json}")
        code = code or (1 if ctx.problems else 0)
    return code


def vm_figures(args: argparse.Namespace) -> dict | None:
    """The VM rows (bench_vm.py), printed; their figures as JSON, None if they could not be taken."""
    try:
        results = bench_vm.run_vm(args.cache_dir, Conditions(0 if args.no_warm else args.warm_gib))
    except BenchError as e:
        print(f"bench: vm: {e}", file=sys.stderr)
        return None
    bench_vm.print_report(results)
    return bench_lib.jsonable(results)


def vm_main(args: argparse.Namespace) -> int:
    """--vm-only: the VM rows alone."""
    try:
        vm = vm_figures(args)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    if vm is None:
        return 1
    if args.json:
        args.json.write_text(json.dumps({"rpfs_revision": bench_lib.git_revision(), "kernel": os.uname().release,
                                         "cpus": os.cpu_count(), "vm": vm}, indent=2, default=str) + "\n")
        print(f"bench: figures written to {args.json}")
    return 0


def catalog_figures(args: argparse.Namespace) -> tuple[int, dict | None]:
    """The catalog rows (bench_catalog.py) in a work folder of their own, printed; (exit code, figures as JSON)."""
    roots: list[Path] = []
    image: Path | None = None
    results, code = None, 0
    with ExitStack() as stack:
        try:
            image, _ = source_image(args.cache_dir, args.size_gib, args.regenerate)
            work = Path(tempfile.mkdtemp(prefix="catalog-", dir=args.cache_dir))
            stack.callback(remove_dir, work)
            roots = [work]
            os.environ["RPFS_RUN_DIR"] = str(work / "run")
            os.environ["RPFS_KEY_FILE"] = str(work / "key")
            results = bench_catalog.run_catalog(Conditions(0 if args.no_warm else args.warm_gib), args.cache_dir,
                                                image, work, args.catalog_files, args.catalog_points, args.peers)
        except BenchError as e:
            print(f"bench: catalog: {e}", file=sys.stderr)
            results, code = None, 1
        except KeyboardInterrupt:
            print("bench: interrupted; cleaning up", file=sys.stderr)
            results, code = None, 130
        finally:
            code = finish_cleanup(roots, image, stack) or code
    if results is None:
        return code, None
    bench_catalog.print_report(results)
    out = bench_lib.jsonable(results)
    out.update(rpfs_revision=bench_lib.git_revision(), kernel=os.uname().release, cpus=os.cpu_count(),
               image=str(image), image_bytes=image.stat().st_size)
    return code, out


def catalog_main(args: argparse.Namespace) -> int:
    """--only catalog: the catalog rows alone."""
    code, catalog = catalog_figures(args)
    if catalog is not None and args.json:
        args.json.write_text(json.dumps({"catalog": catalog}, indent=2, default=str) + "\n")
        print(f"bench: figures written to {args.json}")
    return code or (1 if catalog is None else 0)   # a MISS is a figure, not a failure (as the other targets)


def vault_figures(size_gib: float) -> dict | None:
    """tools/bench-vault on an image of the same size (it prints its own report); its figures, None if it failed."""
    print()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([str(REPO / "tools" / "bench-vault"), "--size-gib", str(size_gib),
                               "--json", out.name])
        return json.loads(Path(out.name).read_text()) if done.returncode == 0 else None


def run_steps(ctx: Context) -> None:
    stores = step_backup(ctx)
    step_read(ctx, stores)
    step_copy(ctx, stores["encrypted"])
    step_restore(ctx, stores["encrypted"])
    bench_peers.run_steps(ctx)
    check_daemon_logs(ctx, ctx.work / "run")


def finish_cleanup(roots: list[Path], image: Path | None, stack: ExitStack) -> int:
    """Sweep what the context managers left, remove our directories, then check nothing remains: 1 if
    anything had to be swept or is still there."""
    code = 0
    swept = sweep(roots, image)
    if swept:
        print(f"bench: HAD TO SWEEP leftovers: {swept}", file=sys.stderr)
        code = 1
    stack.close()
    left = leftovers(roots, image)
    if left:
        print(f"bench: LEFT BEHIND: {left}", file=sys.stderr)
        code = 1
    return code

def print_report(ctx: Context) -> None:
    bench_lib.print_report(ctx)
    bench_peers.print_report(ctx)
    for problem in ctx.problems:
        print(f"!!! {problem}")


if __name__ == "__main__":
    sys.exit(main())
