"""The catalog's speed targets of issue 26 in tools/bench (`--only catalog`, or after the other sections with
`--catalog`), next to restic's `find` and `ls` on the same files.

  cost       on the bench's mixed ext4 image: a cold backup with --no-catalog into one store, the same backup
             with its catalog into another (the catalog's own seconds from `backup --json`), then `rpfs catalog
             VM ID --again` alone (wall, the command's CPU, and the machine's busy CPU: the walk reads through a
             store mount daemon that is not the command's child). Target: the catalog <= 10% of its backup's time.
  incremental after the bench's 1% change (bench_peers.change_files) on a copy of the image: the incremental's
             catalog, its seconds and its new listing bytes against the whole catalog's, and the folders that
             changed (`rpfs diff`). The walk reads every inode of a changed filesystem (its time grows with the
             files), what it stores grows with the changed folders.
  unchanged  the unchanged copy backed up again: how much the catalog databases of the store grow (bytes of keys
             and values in `catalogs`, `listings`, `listing_refs`; target < 64 KiB).
  many       an ext4 image of --catalog-files files (100,000) in ~files/20 folders (built once, kept in the bench's
             cache directory), backed up --catalog-points times (100) with a few files changed, added and removed
             between points through a read-write loop mount; restic backs up the same mounted tree at each point.
             Then, cold (page cache dropped, a fresh process) and warm, as a user runs them (text output):
             `rpfs find NAME VM` of a name in 10% of the folders, `rpfs find '/t03/**' VM`, `rpfs ls VM FOLDER`,
             next to `restic find NAME`, `restic find 'MNT/t03/**'`, `restic ls latest MNT/FOLDER`; the answers
             counted from an untimed --json run. Target: find < 2 s. Figures: docs/dev/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lmdb
from bench_lib import (MiB, RPFS, BenchError, Conditions, Timing, loop_mounted, run, run_timed)

KiB = 1 << 10
VM, DISK = "benchvm", "disk"
CATALOG_IMAGE_VERSION = 1
FOLDER_FILES = 20          # files per folder in the many-points image (100,000 files: 5,000 folders)
COMMON_NAME = "index.html"  # in every 10th folder: a name found in many paths and every point
CHANGED_PER_POINT = 4      # files rewritten between two points (one more added, one removed)
CATALOG_DBS = ("catalogs", "listings", "listing_refs")


@dataclass
class CatalogTarget:
    name: str
    figure: float
    limit: float
    unit: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.figure <= self.limit

    def as_dict(self) -> dict:
        return {"name": self.name, "figure": round(self.figure, 4), "limit": self.limit, "unit": self.unit,
                "detail": self.detail, "passed": self.passed}


# -- measuring -----------------------------------------------------------------------------------------
def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


CPUACCT = Path("/sys/fs/cgroup/cpuacct")   # cgroup v1's CPU accounting, where this kernel has it


@contextmanager
def cpu_group() -> Iterator[Path | None]:
    """A cgroup of our own in which a command and every process it starts are counted (the store mount daemon
    a catalog walks through is started in a session of its own, and reaped by no one we could ask); None where
    there is no cgroup v1 cpuacct hierarchy. Removed after."""
    if not (CPUACCT / "cgroup.procs").exists():
        yield None
        return
    group = CPUACCT / f"rpfs-bench-catalog-{os.getpid()}"
    group.mkdir(exist_ok=True)
    try:
        yield group
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:   # a process of the command still ending
                if time.monotonic() > deadline:
                    print(f"bench: could not remove {group}", flush=True)
                    break
                time.sleep(0.1)


def timed(conditions: Conditions, label: str, cmd: list, drop: bool = True) -> tuple[Timing, str]:
    """run_timed after sync + drop_caches (unless warm) + memory touch. In extra: the machine's busy CPU (every
    process, others' too), and where a cgroup can count it the CPU of the command with every process it started
    (`all_cpu`: the store mount daemon and its readers included)."""
    conditions.prepare(drop)
    print(f"bench:   {label}", flush=True)
    with cpu_group() as group:
        cmd = [str(c) for c in cmd]
        if group is not None:
            cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *cmd]
        busy = machine_busy()
        timing, out = run_timed(label, cmd, 0, capture=True)
        timing.extra["machine_cpu"] = round(machine_busy() - busy, 3)
        if group is not None:
            timing.extra["all_cpu"] = round(int((group / "cpuacct.usage").read_text()) / 1e9, 3)
    return timing, out


def rpfs_cmd(store: Path, *args) -> list:
    return [str(RPFS), "--store", str(store), *[str(a) for a in args]]


def catalog_usage(store: Path) -> dict:
    """Bytes of the keys and values, and of the pages, of the store's catalog databases."""
    env = lmdb.open(str(store), readonly=True, lock=False, max_dbs=256, subdir=True)
    try:
        found = {"records_bytes": 0, "page_bytes": 0, "entries": 0}
        psize = env.stat()["psize"]
        with env.begin(buffers=True) as txn:
            for name in CATALOG_DBS:
                try:
                    db = env.open_db(name.encode(), txn=txn, create=False)
                except lmdb.Error:
                    continue
                stat = txn.stat(db)
                found["page_bytes"] += (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * psize
                found["entries"] += stat["entries"]
                found["records_bytes"] += sum(len(k) + len(v) for k, v in txn.cursor(db))
        return found
    finally:
        env.close()


# -- the bench image: what a catalog costs -------------------------------------------------------------
def step_cost(conditions: Conditions, image: Path, work: Path, r: dict) -> None:
    """Backup with and without its catalog, `rpfs catalog --again`, the 1% incremental, the unchanged point."""
    from bench_peers import change_files
    print("bench: catalog cost on the bench image", flush=True)
    plain, store = work / "store-nocatalog", work / "store-catalog"
    for s in (plain, store):
        shutil.rmtree(s, ignore_errors=True)
        run(rpfs_cmd(s, "init"))
    t_plain, out = timed(conditions, "rpfs backup --no-catalog", rpfs_cmd(plain, "backup", VM, "--disk",
                                                                         f"{DISK}={image}", "--no-catalog", "--json"))
    t_plain.extra["seconds"] = json.loads(out)["seconds"]
    shutil.rmtree(plain)
    t_full, out = timed(conditions, "rpfs backup (with its catalog)",
                        rpfs_cmd(store, "backup", VM, "--disk", f"{DISK}={image}", "--json"))
    full = json.loads(out)
    if not full.get("catalog"):
        raise BenchError(f"the backup made no catalog: {full.get('notes')}")
    t_full.extra.update(seconds=full["seconds"], catalog=summary(full["catalog"]))
    first = full["point_id"]
    t_again, out = timed(conditions, "rpfs catalog VM ID --again", rpfs_cmd(store, "catalog", VM, first, "--again",
                                                                            "--json"))
    t_again.extra["catalog"] = summary(json.loads(out)[0])
    r["full"] = {"no_catalog": t_plain, "with_catalog": t_full, "catalog_again": t_again}

    copy = work / "changed.img"
    run(["cp", "--reflink=auto", "--sparse=always", str(image), str(copy)])
    try:
        written = change_files(copy, work / "mnt-change", 0.01, random.Random(26))
        t_inc, out = timed(conditions, "rpfs backup after 1% changed (with its catalog)",
                           rpfs_cmd(store, "backup", VM, "--disk", f"{DISK}={copy}", "--json"))
        inc = json.loads(out)
        t_inc.extra.update(seconds=inc["seconds"], catalog=summary(inc.get("catalog") or {}), written=written)
        changes = json.loads(run(rpfs_cmd(store, "diff", VM, first, inc["point_id"], "--json")))["changes"]
        folders = {c["path"].rsplit("/", 1)[0] or "/" for c in changes}
        r["incremental"] = {"timing": t_inc, "changed_paths": len(changes), "changed_folders": len(folders),
                            "whole_catalog_listing_bytes": t_full.extra["catalog"]["new_listing_bytes"]}
        before = catalog_usage(store)
        t_same, out = timed(conditions, "rpfs backup of the unchanged disk (with its catalog)",
                            rpfs_cmd(store, "backup", VM, "--disk", f"{DISK}={copy}", "--json"))
        same = json.loads(out)
        t_same.extra.update(seconds=same["seconds"], catalog=summary(same.get("catalog") or {}))
        after = catalog_usage(store)
        r["unchanged"] = {"timing": t_same, "before": before, "after": after,
                          "added_bytes": after["records_bytes"] - before["records_bytes"],
                          "added_page_bytes": after["page_bytes"] - before["page_bytes"]}
    finally:
        copy.unlink(missing_ok=True)
        shutil.rmtree(store, ignore_errors=True)


def summary(catalog: dict) -> dict:
    """The figures of a catalog summary (backup --json's "catalog", or rpfs catalog --json's)."""
    fss = catalog.get("filesystems", [])
    return {"seconds": catalog.get("seconds"), "new_listing_bytes": catalog.get("new_listing_bytes"),
            "reused_disks": catalog.get("reused_disks"), "files": sum(fs.get("files", 0) for fs in fss),
            "folders": sum(fs.get("folders", 0) for fs in fss)}


# -- many points of a filesystem of many files ---------------------------------------------------------
def folder_of(index: int) -> str:
    """The folder a file or folder index lives in: 20 top folders, 16 below each, then numbered ones."""
    return f"t{index % 20:02d}/m{(index // 20) % 16:02d}/d{index // 320:03d}"


def layout(files: int) -> list[str]:
    """The image's files, by relative path: FOLDER_FILES per folder, COMMON_NAME in every 10th folder."""
    folders = max(1, files // FOLDER_FILES)
    paths = []
    for n in range(files):
        folder = n % folders
        name = COMMON_NAME if n < folders and folder % 10 == 0 else \
            f"f{n:06d}{('.txt', '.json', '.py', '.log', '.c')[n % 5]}"
        paths.append(f"{folder_of(folder)}/{name}")
    return paths


def file_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(int(64 * (16384 / 64) ** rng.random()))


def many_files_image(cache_dir: Path, files: int, regenerate: bool) -> Path:
    """The cached ext4 image of `files` small files (built on first use)."""
    image = cache_dir / f"catalog-ext4-{files}f-v{CATALOG_IMAGE_VERSION}.img"
    if image.exists() and not regenerate:
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: generating {image} ({files} files, once; cached for later runs)", flush=True)
    started = time.monotonic()
    rng = random.Random(CATALOG_IMAGE_VERSION)
    tree = Path(tempfile.mkdtemp(prefix="catalog-tree-", dir="/dev/shm"))
    partial = image.with_suffix(".img.partial")
    try:
        for path in layout(files):
            target = tree / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file_bytes(rng))
        size = max(256 * MiB, (files * 10 * KiB) // MiB * MiB)
        with open(partial, "wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", "-N", str(files * 3 // 2 + 1024), "-L", "rpfs-catalog", "-E",
             "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "-d", str(tree), str(partial)])
        partial.rename(image)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tree)
    print(f"bench: generated in {time.monotonic() - started:.0f} s", flush=True)
    return image


def change_a_few(root: Path, paths: list[str], rng: random.Random, point: int) -> None:
    """Between two points: CHANGED_PER_POINT files rewritten, one added, one removed (paths kept current)."""
    for path in rng.sample(paths, CHANGED_PER_POINT):
        (root / path).write_bytes(file_bytes(rng))
    new = f"{folder_of(rng.randrange(len(paths) // FOLDER_FILES or 1))}/new{point:04d}.txt"
    (root / new).write_bytes(file_bytes(rng))
    paths.append(new)
    gone = paths.pop(rng.randrange(len(paths) - 1))
    if not gone.endswith(COMMON_NAME):
        (root / gone).unlink()
    else:
        paths.append(gone)


def step_many(conditions: Conditions, cache_dir: Path, work: Path, files: int, points: int, peers: bool,
              r: dict) -> None:
    """`points` backups of a filesystem of `files` files, by rpfs and restic; then find and ls, cold."""
    from bench_peers import ensure_installed
    ensure_installed(peers)   # restic from Debian on first use, as the peers' section does
    image = many_files_image(cache_dir, files, False)
    print(f"bench: {points} points of {files} files", flush=True)
    disk, store, repo, mnt = work / "many.img", work / "store-many", work / "restic-many", work / "many"
    run(["cp", "--reflink=auto", "--sparse=always", str(image), str(disk)])
    run(rpfs_cmd(store, "init"))
    os.environ.setdefault("RESTIC_PASSWORD", secrets.token_hex(16))   # tools/bench's peers set theirs
    os.environ["RESTIC_CACHE_DIR"] = str(work / "restic-cache")
    if peers:
        run(["restic", "-r", str(repo), "init"])
    paths, rng = layout(files), random.Random(26)
    build = {"rpfs_backup_wall": 0.0, "rpfs_backup_cpu": 0.0, "restic_backup_wall": 0.0, "restic_backup_cpu": 0.0,
             "changes_wall": 0.0}
    started = time.monotonic()
    for point in range(points):
        began = time.monotonic()
        with loop_mounted(disk, mnt, "rw" if point else "ro") as fs:
            if point:
                change_a_few(fs, paths, rng, point)
                os.sync()
            build["changes_wall"] += time.monotonic() - began
            if peers:
                t, _ = run_timed("restic backup", ["restic", "-r", str(repo), "backup", "--quiet", str(fs)], 0)
                build["restic_backup_wall"] += t.wall
                build["restic_backup_cpu"] += t.cpu
        t, _ = run_timed("rpfs backup", rpfs_cmd(store, "backup", VM, "--disk", f"{DISK}={disk}", "--no-catalog"), 0)
        build["rpfs_backup_wall"] += t.wall
        build["rpfs_backup_cpu"] += t.cpu
        if point % 10 == 9 or point == points - 1:
            print(f"bench:   {point + 1} of {points} points ({time.monotonic() - started:.0f} s)", flush=True)
    build["seconds"] = time.monotonic() - started
    t_catalog, out = timed(conditions, f"rpfs catalog of {points} points", rpfs_cmd(store, "catalog", VM, "--json"),
                           drop=False)
    made = json.loads(out)
    t_catalog.extra.update(points=len(made), listing_bytes=sum(s["new_listing_bytes"] for s in made),
                           listing_bytes_each=[s["new_listing_bytes"] for s in made],
                           seconds_each=[round(s["seconds"], 2) for s in made], usage=catalog_usage(store))
    build["catalog"] = t_catalog
    r["many"] = {"files": files, "folders": files // FOLDER_FILES, "points": points, "build": build}

    folder = folder_of(5)
    r["many"]["queries"] = queries(conditions, store, repo if peers else None, mnt, folder)
    r["many"]["ls_folder"] = f"/{folder}"
    r["many"]["restic_repo_bytes"] = du(repo) if peers else None
    r["many"]["rpfs_store_bytes"] = du(store)
    for path in (store, repo):
        shutil.rmtree(path, ignore_errors=True)
    disk.unlink(missing_ok=True)


def queries(conditions: Conditions, store: Path, repo: Path | None, mnt: Path, folder: str) -> dict:
    """find and ls of rpfs (and restic, given its repository), each cold then warm, timed as a user runs them
    (their text output; --json's pretty printing of 500,000 matches costs more than the search); the
    answers' sizes from an untimed --json run after."""
    asked = {"find_name": ([COMMON_NAME, VM], [COMMON_NAME]),
             "find_tree": (["/t03/**", VM], [f"{mnt}/t03/**"]),
             "ls": ([VM, f"/{folder}"], ["latest", f"{mnt}/{folder}"])}
    found: dict = {}
    for name, (ours, theirs) in asked.items():
        command = name.split("_")[0]
        rows = {}
        tools = {"rpfs": lambda *more: rpfs_cmd(store, command, *ours, *more)}
        if repo is not None:
            tools["restic"] = lambda *more: ["restic", "-r", str(repo), command, *more, *theirs]
        for tool, cmd in tools.items():
            for drop in (True, False):
                kind = "cold" if drop else "warm"
                rows[f"{tool}_{kind}"], _ = timed(conditions, f"{tool} {name} ({kind})", cmd(), drop=drop)
            out = run(cmd("--json"))
            for kind in ("cold", "warm"):
                rows[f"{tool}_{kind}"].extra["answer"] = answer_size(name, out, rpfs=tool == "rpfs")
        found[name] = rows
    return found


def answer_size(query: str, out: str, rpfs: bool) -> dict:
    """How much an answer holds (paths; matches over every point), so the two tools' answers can be compared."""
    if rpfs:
        data = json.loads(out)
        if query == "ls":
            return {"entries": sum(len(f["entries"]) for f in data["folders"])}
        return {"paths": len(data["found"]),
                "matches": sum(len(v["points"]) for f in data["found"] for v in f["versions"])}
    if query == "ls":
        return {"entries": max(0, sum(1 for line in out.splitlines() if '"struct_type":"node"' in line) - 1)}
    data = json.loads(out) if out.strip() else []
    return {"paths": len({m["path"] for snap in data for m in snap.get("matches", [])}),
            "matches": sum(len(snap.get("matches", [])) for snap in data)}


def du(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_blocks * 512 for d, _, names in os.walk(path) for n in names)


# -- the whole section -----------------------------------------------------------------------------------
def run_catalog(conditions: Conditions, cache_dir: Path, image: Path, work: Path, files: int, points: int,
                peers: bool) -> dict:
    r: dict = {}
    step_cost(conditions, image, work, r)
    if points > 0:
        step_many(conditions, cache_dir, work, files, points, peers, r)
    r["targets"] = [t.as_dict() for t in targets(r)]
    return r


def targets(r: dict) -> list[CatalogTarget]:
    found = []
    full = r.get("full")
    if full:
        t = full["with_catalog"]
        catalog, backup = t.extra["catalog"]["seconds"], t.extra["seconds"]
        found.append(CatalogTarget("cataloging a point <= 10% of its backup's time", catalog / backup, 0.10, "ratio",
                                   f"{catalog:.2f} s vs {backup:.2f} s (rpfs's own timers, the full backup)"))
    inc = r.get("incremental")
    if inc:
        t = inc["timing"]
        catalog, backup = t.extra["catalog"]["seconds"] or 0.0, t.extra["seconds"]
        found.append(CatalogTarget("  the same for the incremental after 1%", catalog / backup, 0.10, "ratio",
                                   f"{catalog:.2f} s vs {backup:.2f} s"))
    same = r.get("unchanged")
    if same:
        found.append(CatalogTarget("a point of an unchanged disk adds < 64 KiB of catalog", same["added_bytes"] / KiB,
                                   64, "KiB", f"{same['added_bytes']} bytes of records, "
                                              f"{same['added_page_bytes']} bytes of LMDB pages"))
    many = r.get("many")
    if many:
        for name, label in (("find_name", f"find {COMMON_NAME}"), ("find_tree", "find '/t03/**'")):
            t = many["queries"][name]["rpfs_cold"]
            found.append(CatalogTarget(f"{label} across {many['points']} points of {many['files']} files < 2 s, cold",
                                       t.wall, 2.0, "s", f"{t.cpu:.2f} CPU s; {t.extra['answer']}"))
    return found


def print_report(r: dict) -> None:
    print()
    print("catalog (issue 26):")
    full = r.get("full")
    if full:
        print(f"{'step':<58} {'wall s':>7} {'CPU s':>7} {'all CPU':>8} {'machine':>8} {'catalog s':>10} "
              f"{'new listings':>13}")
        rows = [full["no_catalog"], full["with_catalog"], full["catalog_again"]]
        rows += [r[k]["timing"] for k in ("incremental", "unchanged") if k in r]
        for t in rows:
            c = t.extra.get("catalog") or {}
            print(f"{t.label:<58} {t.wall:>7.2f} {t.cpu:>7.2f} {t.extra.get('all_cpu', 0):>8.2f} "
                  f"{t.extra['machine_cpu']:>8.2f} "
                  f"{c.get('seconds') or 0:>10.2f} {c.get('new_listing_bytes') or 0:>13,}")
        w = full["with_catalog"]
        print(f"(CPU s: the command's own; all CPU: with every process it started, the store mount daemon the walk"
              f" reads through and its readers included; machine: every core's busy time over the step, other work"
              f" on the machine included; the image's catalog: {w.extra['catalog']['files']} files, "
              f"{w.extra['catalog']['folders']} folders)")
        print(f"backup wall with its catalog - without: {w.wall - full['no_catalog'].wall:+.2f} s")
    inc = r.get("incremental")
    if inc:
        c = inc["timing"].extra["catalog"]
        print(f"incremental after 1% ({inc['timing'].extra['written'] / MiB:.0f} MiB written): {inc['changed_paths']}"
              f" paths changed in {inc['changed_folders']} folders; its catalog read all {c['files']} files "
              f"({c['seconds']:.2f} s) and stored {c['new_listing_bytes']:,} bytes of new listings of "
              f"{inc['whole_catalog_listing_bytes']:,} for the whole catalog")
    same = r.get("unchanged")
    if same:
        c = same["timing"].extra["catalog"]
        print(f"unchanged disk: catalog databases +{same['added_bytes']:,} bytes of records (+{same['added_page_bytes']:,}"
              f" of LMDB pages); disks not read again: {c['reused_disks']}; catalog {c['seconds']:.2f} s")
    many = r.get("many")
    if many:
        b = many["build"]
        cat = b["catalog"]
        print(f"many points: {many['points']} points of {many['files']} files in {many['folders']} folders, built in "
              f"{b['seconds']:.0f} s (rpfs backups {b['rpfs_backup_wall']:.0f} s / {b['rpfs_backup_cpu']:.0f} CPU s,"
              f" restic backups {b['restic_backup_wall']:.0f} s / {b['restic_backup_cpu']:.0f} CPU s, changes "
              f"{b['changes_wall']:.0f} s)")
        each = cat.extra["seconds_each"]
        print(f"  rpfs catalog of the {cat.extra['points']} points: {cat.wall:.0f} s, {cat.cpu:.0f} CPU s "
              f"({cat.extra.get('all_cpu', 0):.0f} with the store mount daemon), machine "
              f"{cat.extra['machine_cpu']:.0f} s; per point {min(each):.2f}-{max(each):.2f} s; listings "
              f"{cat.extra['listing_bytes']:,} bytes; catalog databases {cat.extra['usage']['records_bytes']:,} bytes")
        rest = sorted(cat.extra.get("listing_bytes_each", [])[1:])
        if rest:
            print(f"  new listings: the first point {cat.extra['listing_bytes_each'][0]:,} bytes (the whole tree); each"
                  f" later point (a few files changed) {rest[0]:,}-{rest[-1]:,}, median {rest[len(rest) // 2]:,}")
        print(f"  stores: rpfs {many['rpfs_store_bytes'] / MiB:.0f} MiB, restic "
              f"{(many['restic_repo_bytes'] or 0) / MiB:.0f} MiB")
        print(f"  {'query':<42} {'rpfs wall / CPU s':>18} {'restic wall / CPU s':>20} {'ratio':>6}  answers")
        for name, rows in many["queries"].items():
            for kind in ("cold", "warm"):
                ours, theirs = rows[f"rpfs_{kind}"], rows.get(f"restic_{kind}")
                cell = f"{theirs.wall:.2f} / {theirs.cpu:.2f}" if theirs else ""
                ratio = f"{theirs.wall / ours.wall:.1f}x" if theirs else ""
                what = name.replace("find_name", f"find {COMMON_NAME}").replace("find_tree", "find /t03/**") \
                    .replace("ls", f"ls {many['ls_folder']}")
                print(f"  {what + ' (' + kind + ')':<42} {ours.wall:>8.2f} / {ours.cpu:<7.2f} {cell:>20} {ratio:>6}  "
                      f"rpfs {ours.extra['answer']}" + (f", restic {theirs.extra['answer']}" if theirs else ""))
        print("  (ratio: restic's wall / rpfs's; cold: page cache dropped, a fresh process; restic keeps its"
              " local cache of the repository's index and trees)")
    found = r.get("targets", [])
    if found:
        print("targets (issue 26):")
        for t in found:
            print(f"  {t['name']:<72} {t['figure']:8.3f} {t['unit']:<5} <= {t['limit']:<5} "
                  f"{'PASS' if t['passed'] else 'MISS'}   {t['detail']}")
