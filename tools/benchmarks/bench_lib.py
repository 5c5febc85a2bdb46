"""The rpfs benchmark behind tools/bench: one run, rpfs next to baselines on the same image.

Steps, each timed as wall seconds, MiB/s and CPU seconds (user+sys of the child, plus the FUSE daemon's
own CPU where one serves the reads):
  backup     rpfs backup into a fresh store (encrypted, the default)  vs  the same into an unencrypted store
             (--encryption none; runs taken in turns)  vs  sha256sum, openssl dgst -sha256, zstd -3 (-T1, -T0)
  read       cat of the image through a fresh rpfs mount of each store (in turns)  vs  cat of the source image
  copy-out   cp -a of all files through rpfs attach  vs  cp -a from the source image loop-mounted
  restore    rpfs restore of the disk to a sparse file  vs  cp --sparse=always of the source image + sync
             (rpfs restore fsyncs its file, so the cp baseline is synced too); both written beside the store
Then (tools/benchmarks/bench_peers.py, unless --no-peers) rpfs next to restic, borg and bindfs doing the same jobs on a copy of
the image on a reflink XFS (incremental backups with change tracking, store growth, restore, mounts, a loop device
on each mount, fio), rpfs's own targets (change tracking on a --tracking-size-gib image, metadata of an unchanged
1 TiB disk) and every target of issue 11 as a ratio, PASS or MISS. Then (tools/bench-vault, unless --no-vault)
the vault's figures of issue 12 on an image of the same size: push and restore against the Ceph gateway next to
plain boto3 transfers of the same bytes, and an incremental push.
Page cache is dropped before every timed step (not before a warm one), then (unless --no-warm) a few GiB of
memory are touched and freed just before the command starts: this VM hands freed memory back to its host, and a
step that must fault it back in pays for it in system time (cold `cat` of the 1.5 GiB image: 0.9-1.0 s right
after a warm-up, 2.2-3.4 s once freed memory has sat for 5 s). Runs still vary by ~30%: use --repeat 3
for figures to compare. Everything mounted or attached is undone in a finally; the generated source
image is kept in the cache directory for the next run.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent.parent
RPFS = REPO / ".venv" / "bin" / "rpfs"
MiB = 1 << 20
GiB = 1 << 30
IMAGE_VERSION = 1          # bump when the generator changes, so cached images are rebuilt
VM, DISK = "benchvm", "disk"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Figures measured elsewhere that rpfs should beat (MiB/s; a range where the source gave one).
REFERENCES = {
    "backup": ("borg 1.2 backup", 490, 490),
    "read": ("borg mount read", 600, 880),
    "copy": ("restic mount copy-out via attach", 220, 220),
}

# Shares of the filesystem's content; together they fill about FILL of the image.
FILL = 0.78
SHARES = {"random": 0.40, "text": 0.35, "duplicate": 0.25}
DUPLICATE_COPIES = 4


class BenchError(Exception):
    """A step that cannot go on; printed as one line."""


# -- measuring ---------------------------------------------------------------------------------------
@dataclass
class Timing:
    """One timed command: its wall time, its own CPU, and the CPU of a daemon serving it."""

    label: str
    nbytes: int
    wall: float
    cpu_user: float
    cpu_sys: float
    daemon_user: float = 0.0
    daemon_sys: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.wall if self.wall > 0 else 0.0

    @property
    def daemon_cpu(self) -> float:
        return self.daemon_user + self.daemon_sys

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys + self.daemon_cpu

    def as_dict(self) -> dict:
        return {**asdict(self), "mib_s": round(self.mib_s, 1), "cpu": round(self.cpu, 3)}


def process_cpu(pid: int | None) -> tuple[float, float]:
    """(user, sys) seconds of a running process that is not our child, so getrusage cannot see it."""
    if pid is None:
        return 0.0, 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def run_timed(label: str, cmd: list[str], nbytes: int, daemon_pid: int | None = None,
              capture: bool = False) -> tuple[Timing, str]:
    """Run cmd (stdout to /dev/null unless captured); CPU from RUSAGE_CHILDREN deltas."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon_before = process_cpu(daemon_pid)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=environment(cmd))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon_after = process_cpu(daemon_pid)
    if proc.returncode != 0:
        raise BenchError(f"{label}: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    timing = Timing(label, nbytes, wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                    daemon_after[0] - daemon_before[0], daemon_after[1] - daemon_before[1])
    return timing, proc.stdout or ""


def best_of(repeat: int, once: Callable[[], Timing]) -> Timing:
    """Run a timed step `repeat` times and keep the fastest (every run's wall time goes in its extra)."""
    return best_in_turns(repeat, {"": once})[""]


def best_in_turns(repeat: int, steps: dict[str, Callable[[], Timing]]) -> dict[str, Timing]:
    """Each step `repeat` times, taken in turns (so a noisy moment of the machine hits them alike); the
    fastest run of each."""
    runs: dict[str, list[Timing]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, once in steps.items():
            runs[name].append(once())
    best = {}
    for name, timings in runs.items():
        best[name] = min(timings, key=lambda t: t.wall)
        if repeat > 1:
            best[name].extra["all_walls"] = [round(t.wall, 3) for t in timings]
    return best


class Conditions:
    """What happens before every timed step: sync, drop the page cache (not for a warm run), touch memory."""

    def __init__(self, warm_gib: float):
        self.warm_gib = warm_gib

    def prepare(self, drop: bool = True) -> None:
        os.sync()
        if drop:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        if self.warm_gib > 0:
            touch = f"b = b'\\x5a' * {int(self.warm_gib * GiB)}; del b"
            subprocess.run([sys.executable, "-c", touch], check=True)


# -- shell helpers -----------------------------------------------------------------------------------
PLAIN_STORE = "store-unencrypted"   # the unencrypted store's folder name (step_backup)


def environment(cmd: list[str]) -> dict:
    """The bench's environment, whose RPFS_KEY_FILE opens the encrypted stores; without it for a command on
    the unencrypted store, which refuses any key given (docs/manual/encryption.md)."""
    cmd = [str(part) for part in cmd]
    plain = "--store" in cmd[:-1] and Path(cmd[cmd.index("--store") + 1]).name == PLAIN_STORE
    return {k: v for k, v in os.environ.items() if not (plain and k == "RPFS_KEY_FILE")}


def run(cmd: list[str], capture: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=capture, text=True, stdin=subprocess.DEVNULL, env=environment(cmd))
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-500:] if capture else ""
        raise BenchError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {detail}")
    return proc.stdout or ""


def rpfs(store: Path | None, *args: str) -> str:
    return run([str(RPFS), *(["--store", str(store)] if store else []), *args])


def mounts_under(root: Path) -> list[str]:
    """Mountpoints at or below root, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def retry(action: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Retry an undo step that may briefly fail (a loop device still releasing its backing file)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            action()
            return
        except BenchError as e:
            if time.monotonic() > deadline:
                print(f"bench: CLEANUP FAILED: {what}: {e}", file=sys.stderr)
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


# -- mounts, each undone on the way out --------------------------------------------------------------
@contextmanager
def rpfs_mounted(store: Path, mountpoint: Path, cache_mb: int) -> Iterator[int]:
    """A fresh rpfs mount (cold block cache); yields the daemon's pid."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    answer = json.loads(rpfs(store, "mount", str(mountpoint), "--cache-mb", str(cache_mb), "--json"))
    try:
        pid = int(answer["pid"])
        check_daemon(pid, mountpoint)
        yield pid
    finally:
        if mounts_under(mountpoint):
            retry(lambda: rpfs(None, "umount", str(mountpoint)), f"rpfs umount {mountpoint}")


def check_daemon(pid: int, mountpoint: Path) -> None:
    """The pid rpfs mount reported must be the process serving this mountpoint."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [w.decode(errors="replace") for w in cmdline]
    if not (any("rpfs" in w for w in words) and "mount" in words and str(mountpoint) in words):
        raise BenchError(f"pid {pid} does not look like the rpfs daemon for {mountpoint}: {words}")


@contextmanager
def attached(image: Path, dest: Path) -> Iterator[Path]:
    """rpfs attach of a whole-disk image; yields the mounted filesystem's directory."""
    found = json.loads(rpfs(None, "attach", str(image), str(dest), "--json"))
    try:
        mounted = [f for f in found if f["status"] == "mounted"]
        if len(mounted) != 1:
            raise BenchError(f"rpfs attach mounted {len(mounted)} filesystems, expected 1: {found}")
        yield Path(mounted[0]["mountpoint"])
    finally:
        if mounts_under(dest):
            retry(lambda: rpfs(None, "detach", str(dest)), f"rpfs detach {dest}")


@contextmanager
def loop_mounted(image: Path, mountpoint: Path, options: str = "ro,noload") -> Iterator[Path]:
    """The source image's ext4 (read-only unless options say "rw"), through an auto-clearing loop device."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", "-o", f"{options},loop", str(image), str(mountpoint)])
    try:
        yield mountpoint
    finally:
        retry(lambda: run(["umount", str(mountpoint)]), f"umount {mountpoint}")


# -- the source image --------------------------------------------------------------------------------
class LogText:
    """Log-like text: timestamps, hosts, levels and Zipf-distributed words; zstd -3 shrinks it ~3-4x."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
        weights, total = [], 0.0
        for rank in range(len(self.words)):
            total += 1 / (rank + 1)
            weights.append(total)
        self.cum_weights = weights
        self.hosts = [f"web{i:02d}" for i in range(12)] + [f"db{i}" for i in range(3)]
        self.levels = ["INFO"] * 8 + ["DEBUG"] * 4 + ["WARN", "ERROR"]
        self.parts = ["http", "db", "auth", "cache", "queue", "scheduler", "mailer"]
        self.clock = 1_700_000_000

    def text(self, size: int) -> bytes:
        rng, lines, total = self.rng, [], 0
        while total < size:
            words = rng.choices(self.words, cum_weights=self.cum_weights, k=400)
            i = 0
            for _ in range(40):
                n = 3 + len(words[i]) % 8
                self.clock += rng.random() < 0.3
                t = time.gmtime(self.clock)
                line = (f"{t.tm_year}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
                        f".{rng.randrange(1000):03d}Z {rng.choice(self.hosts)} {rng.choice(self.levels)} "
                        f"[{rng.choice(self.parts)}] {' '.join(words[i:i + n])} id={rng.getrandbits(32):08x} "
                        f"took={rng.randrange(5000)}ms\n")
                i += n
                lines.append(line)
                total += len(line)
        return "".join(lines).encode()[:size]


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(low * (high / low) ** rng.random())


def write_tree(root: Path, content_bytes: int, rng: random.Random) -> dict:
    """Random, text and duplicated files under root; returns what was written, by kind."""
    text = LogText(rng)
    stats = {"random_bytes": 0, "text_bytes": 0, "duplicate_bytes": 0, "duplicate_distinct_bytes": 0,
             "files": 0, "dirs": 0}

    def put(kind: str, index: int, data: bytes, copy: int | None = None) -> None:
        folder = root / kind / f"d{index % 17:02d}" / f"s{index % 5}"
        if copy is not None:
            folder = root / f"copy{copy}" / folder.relative_to(root)
        if not folder.exists():
            folder.mkdir(parents=True)
            stats["dirs"] += 1
        suffix = ".log" if kind == "text" else ".bin"
        (folder / f"f{index:05d}{suffix}").write_bytes(data)
        stats["files"] += 1

    def fill(kind: str, budget: int, low: int, high: int, make: Callable[[int, int], bytes]) -> None:
        written, index = 0, 0
        while written < budget:
            size = min(log_uniform(rng, low, high), budget - written)
            data = make(index, size)
            if kind == "duplicate":
                for copy in range(DUPLICATE_COPIES):
                    put(kind, index, data, copy)
                stats["duplicate_distinct_bytes"] += size
                written += size * DUPLICATE_COPIES
            else:
                put(kind, index, data)
                written += size
            stats[f"{kind}_bytes"] += size * (DUPLICATE_COPIES if kind == "duplicate" else 1)
            index += 1

    fill("random", int(content_bytes * SHARES["random"]), 4 << 10, 32 * MiB, lambda i, n: os.urandom(n))
    fill("text", int(content_bytes * SHARES["text"]), 1 << 10, 4 * MiB, lambda i, n: text.text(n))
    fill("duplicate", int(content_bytes * SHARES["duplicate"]), 16 << 10, 8 * MiB,
         lambda i, n: os.urandom(n) if i % 2 else text.text(n))
    return stats


def make_ext4(image: Path, tree: Path, size: int) -> None:
    """A whole-disk ext4 populated from tree without mounting; free space is real zeros, not holes,
    so every reader (rpfs, cat, sha256sum) has to read it like it would on a block device."""
    zeros = bytes(MiB)
    with open(image, "wb") as f:
        for _ in range(size // MiB):
            f.write(zeros)
    run(["mkfs.ext4", "-q", "-F", "-L", "rpfs-bench", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
         "-d", str(tree), str(image)])


def fs_used_bytes(image: Path) -> int:
    info = {}
    for line in run(["dumpe2fs", "-h", str(image)]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    block = int(info["Block size"])
    return (int(info["Block count"]) - int(info["Free blocks"])) * block


def source_image(cache_dir: Path, size_gib: float, regenerate: bool) -> tuple[Path, dict]:
    """The cached mixed ext4 image for this size (built on first use) and what it holds."""
    size = int(size_gib * GiB) // MiB * MiB
    image = cache_dir / f"mixed-ext4-{size // MiB}m-v{IMAGE_VERSION}.img"
    about = image.with_suffix(".json")
    if image.exists() and about.exists() and not regenerate:
        return image, json.loads(about.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: generating {image} ({size / GiB:.2f} GiB, once; cached for later runs)", flush=True)
    started = time.monotonic()
    partial = image.with_suffix(".img.partial")
    tree = Path(tempfile.mkdtemp(prefix="tree-", dir=cache_dir))
    try:
        stats = write_tree(tree, int(size * FILL), random.Random(IMAGE_VERSION))
        make_ext4(partial, tree, size)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tree)
    stats.update(image_bytes=size, fs_used_bytes=fs_used_bytes(partial))
    stats["zero_bytes_approx"] = size - stats["fs_used_bytes"]
    about.write_text(json.dumps(stats, indent=2) + "\n")
    partial.rename(image)
    print(f"bench: generated in {time.monotonic() - started:.0f} s", flush=True)
    return image, stats


# -- the steps ---------------------------------------------------------------------------------------
@dataclass
class Context:
    image: Path
    image_bytes: int
    work: Path               # on disk, beside the cached image: stores, mountpoints
    scratch: Path            # tmpfs: copy-out destinations, so the local disk's write speed stays out
    conditions: Conditions
    repeat: int
    cache_mb: int
    about: dict              # what the image holds (source_image)
    cache_dir: Path = Path("/var/tmp/rpfs-bench")   # where source images are kept (the tracking image too)
    peers: bool = True       # restic, borg and bindfs next to rpfs (tools/benchmarks/bench_peers.py)
    tracking_gib: float = 4.0  # the image of the change-tracking target; 0: not measured
    fio_seconds: int = 15
    results: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    def timed(self, label: str, cmd: list[str], nbytes: int | None = None, drop: bool = True,
              **kw) -> tuple[Timing, str]:
        self.conditions.prepare(drop)
        print(f"bench:   {label}", flush=True)
        return run_timed(label, cmd, self.image_bytes if nbytes is None else nbytes, **kw)


def step_backup(ctx: Context) -> dict[str, Path]:
    """rpfs backup into a fresh store per run, encrypted and not, and the hash/compress baselines; returns
    the last store of each kind."""
    print("bench: backup", flush=True)
    stores: dict[str, Path] = {}

    def backup_once(kind: str, init_args: list[str]) -> Callable[[], Timing]:
        def once() -> Timing:
            if kind in stores:
                shutil.rmtree(stores[kind])
            store = stores[kind] = ctx.work / f"store-{kind}"   # PLAIN_STORE for the unencrypted one
            rpfs(store, "init", *init_args)
            timing, out = ctx.timed(f"rpfs backup ({kind})", [str(RPFS), "--store", str(store), "backup", VM,
                                                              "--disk", f"{DISK}={ctx.image}", "--json"], capture=True)
            summary = json.loads(out)
            summary.pop("recovery_point", None)
            timing.extra.update(summary=summary, store_disk_bytes=disk_usage(store))
            return timing
        return once

    rows = best_in_turns(ctx.repeat, {"rpfs": backup_once("encrypted", []),
                                      "rpfs unencrypted": backup_once("unencrypted", ["--encryption", "none"])})
    digests = {}

    def baseline(label: str, cmd: list[str], digest_word: int | None = None) -> Callable[[], Timing]:
        """A baseline run; a hashing one also records its digest (the word at digest_word)."""
        def once() -> Timing:
            timing, out = ctx.timed(label, cmd, capture=digest_word is not None)
            if digest_word is not None:
                digests[label] = out.split()[digest_word]
            return timing
        return once

    image = str(ctx.image)
    rows["sha256sum"] = best_of(ctx.repeat, baseline("sha256sum", ["sha256sum", image], 0))
    rows["openssl"] = best_of(ctx.repeat, baseline("openssl dgst -sha256", ["openssl", "dgst", "-sha256", image], -1))
    rows["zstd"] = best_of(ctx.repeat, baseline("zstd -3 -c", ["zstd", "-3", "-q", "-c", image]))
    rows["zstd_mt"] = best_of(ctx.repeat, baseline("zstd -3 -T0 -c", ["zstd", "-3", "-T0", "-q", "-c", image]))
    if len(set(digests.values())) != 1:
        ctx.problems.append(f"sha256sum and openssl disagree on the image: {digests}")
    ctx.results["backup"] = rows
    ctx.results["duplicate_copy_bytes"] = ctx.about["duplicate_bytes"] - ctx.about["duplicate_distinct_bytes"]
    ctx.results["image_sha256"] = digests.get("sha256sum")
    return stores


def step_read(ctx: Context, stores: dict[str, Path]) -> None:
    """cat of the image through a fresh mount per run (cold block cache), of the encrypted and of the
    unencrypted store in turns, vs cat of the source."""
    print("bench: read", flush=True)
    mountpoint = ctx.work / "mnt-read"
    memory: dict = {}

    def rpfs_once(kind: str) -> Callable[[], Timing]:
        def once() -> Timing:
            with rpfs_mounted(stores[kind], mountpoint, ctx.cache_mb) as pid:
                timing, _ = ctx.timed(f"cat through rpfs mount ({kind})", ["cat", str(mount_image(mountpoint))],
                                      daemon_pid=pid)
                keep_peak(memory, daemon_memory(pid))
            return timing
        return once

    rows = best_in_turns(ctx.repeat, {"rpfs": rpfs_once("encrypted"), "rpfs unencrypted": rpfs_once("unencrypted")})
    rows["cat"] = best_of(ctx.repeat, lambda: ctx.timed("cat of source image", ["cat", str(ctx.image)])[0])
    ctx.results["read"] = rows
    ctx.results["daemon_after_read"] = {**memory, "cache_mb": ctx.cache_mb}
    for store in stores.values():
        verify_mount_image(ctx, store, mountpoint)


def mount_image(mountpoint: Path) -> Path:
    return mountpoint / VM / "latest" / f"{DISK}.img"


def verify_mount_image(ctx: Context, store: Path, mountpoint: Path) -> None:
    """Untimed: the image served by the mount must hash to the source's digest."""
    expected = ctx.results.get("image_sha256")
    with rpfs_mounted(store, mountpoint, ctx.cache_mb):
        got = run(["sha256sum", str(mount_image(mountpoint))]).split()[0]
    ctx.results["mount_image_matches"] = got == expected
    if got != expected:
        ctx.problems.append(f"MISMATCH: the image read through the mount hashes to {got}, the source to {expected}")


def step_copy(ctx: Context, store: Path) -> None:
    """cp -a of every file through rpfs attach (fresh mount per run) vs from the loop-mounted source."""
    print("bench: copy-out", flush=True)
    mountpoint, dest, source_mnt = ctx.work / "mnt-copy", ctx.work / "attach", ctx.work / "source"
    out_rpfs, out_source = ctx.scratch / "out-rpfs", ctx.scratch / "out-source"
    memory: dict = {}
    with loop_mounted(ctx.image, source_mnt):
        nbytes, files = tree_size(source_mnt)

        def rpfs_once() -> Timing:
            fresh_dir(out_rpfs)
            with rpfs_mounted(store, mountpoint, ctx.cache_mb) as pid, attached(mount_image(mountpoint), dest) as fs:
                timing, _ = ctx.timed("cp -a through rpfs attach", ["cp", "-a", f"{fs}/.", f"{out_rpfs}/"], nbytes,
                                      daemon_pid=pid)
                keep_peak(memory, daemon_memory(pid))
            return timing

        def source_once() -> Timing:
            fresh_dir(out_source)
            return ctx.timed("cp -a from source loop mount", ["cp", "-a", f"{source_mnt}/.", f"{out_source}/"],
                             nbytes)[0]

        rows = {"rpfs": best_of(ctx.repeat, rpfs_once), "cp": best_of(ctx.repeat, source_once)}
    ctx.results["copy"] = rows
    ctx.results["copy_files"] = files
    ctx.results["daemon_after_copy"] = {**memory, "cache_mb": ctx.cache_mb}
    compare_trees(ctx, out_rpfs, out_source)
    shutil.rmtree(out_rpfs)     # both live in memory (tmpfs), which the later steps need
    shutil.rmtree(out_source)


def step_restore(ctx: Context, store: Path) -> None:
    """rpfs restore to a sparse file vs cp --sparse=always of the source, both on the store's disk."""
    print("bench: restore", flush=True)
    out_rpfs, out_cp = ctx.work / "restored.img", ctx.work / "cp.img"

    def rpfs_once() -> Timing:
        out_rpfs.unlink(missing_ok=True)
        timing, out = ctx.timed("rpfs restore", [str(RPFS), "--store", str(store), "restore", VM, "--disk", DISK,
                                                 "--to", str(out_rpfs), "--json"], capture=True)
        timing.extra.update(summary=json.loads(out)["disks"][0], disk_bytes=out_rpfs.stat().st_blocks * 512)
        return timing

    def cp_once() -> Timing:
        out_cp.unlink(missing_ok=True)
        timing, _ = ctx.timed("cp --sparse=always + sync", ["sh", "-c", 'cp --sparse=always "$0" "$1" && sync "$1"',
                                                           str(ctx.image), str(out_cp)])
        timing.extra["disk_bytes"] = out_cp.stat().st_blocks * 512
        return timing

    try:
        ctx.results["restore"] = {"rpfs": best_of(ctx.repeat, rpfs_once), "cp": best_of(ctx.repeat, cp_once)}
        same = subprocess.run(["cmp", str(ctx.image), str(out_rpfs)], capture_output=True, text=True)
        ctx.results["restore_matches"] = same.returncode == 0
        if same.returncode != 0:
            ctx.problems.append(f"MISMATCH: the restored image differs from the source: "
                                f"{(same.stdout + same.stderr).strip()[:300]}")
    finally:
        out_rpfs.unlink(missing_ok=True)
        out_cp.unlink(missing_ok=True)


def compare_trees(ctx: Context, a: Path, b: Path) -> None:
    """Contents (diff -r) and metadata (mode, owner, size, mtime) of both copies must match."""
    diff = subprocess.run(["diff", "-r", "-q", "--no-dereference", str(a), str(b)], capture_output=True, text=True)
    same_meta = metadata_listing(a) == metadata_listing(b)
    ctx.results["copies_identical"] = diff.returncode == 0 and same_meta
    if diff.returncode != 0:
        lines = (diff.stdout + diff.stderr).strip().splitlines()
        ctx.problems.append(f"MISMATCH: files copied through attach differ from the source ({len(lines)} lines): "
                            + "; ".join(lines[:10]))
    if not same_meta:
        ctx.problems.append("MISMATCH: metadata (mode/owner/size/mtime) of the copies differ")


def metadata_listing(root: Path) -> list[str]:
    return sorted(run(["find", str(root), "-mindepth", "1", "-printf", "%P %y %m %U %G %s %T@ %l\n"]).splitlines())


def daemon_memory(pid: int) -> dict:
    """Peak resident set and anonymous memory of the mount daemon, in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    return found


def keep_peak(memory: dict, sample: dict) -> None:
    """Over repeated runs (one fresh daemon each), keep the highest figure."""
    for key, value in sample.items():
        memory[key] = max(memory.get(key, 0), value)


def tree_size(root: Path) -> tuple[int, int]:
    total = files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            total += st.st_size
            files += 1
    return total, files


def disk_usage(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_blocks * 512 for d, _, names in os.walk(path) for n in names)


def fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# -- reporting ---------------------------------------------------------------------------------------
STEP_TITLES = {"backup": "backup", "read": "read image", "copy": "copy files out", "restore": "full restore"}


def print_report(ctx: Context) -> None:
    r, about = ctx.results, ctx.about
    print()
    print(f"image {ctx.image.name}: {ctx.image_bytes / GiB:.2f} GiB; ext4 used {about['fs_used_bytes'] / GiB:.2f} GiB "
          f"(random {about['random_bytes'] / MiB:.0f} MiB, text {about['text_bytes'] / MiB:.0f} MiB, "
          f"duplicates {about['duplicate_bytes'] / MiB:.0f} MiB = {DUPLICATE_COPIES} x "
          f"{about['duplicate_distinct_bytes'] / MiB:.0f} MiB), {about['files']} files")
    header = f"{'step':<15} {'command':<32} {'wall s':>7} {'MiB/s':>8} {'CPU s':>7} {'daemon':>7} {'rpfs speed':>11}"
    print(header)
    print("-" * len(header))
    for step, title in STEP_TITLES.items():
        rows = r.get(step)
        if not rows:
            continue
        ours = rows["rpfs"]
        for key, t in rows.items():
            ratio = "" if key == "rpfs" else f"{ours.mib_s / t.mib_s:.2f}x"
            daemon = f"{t.daemon_cpu:.2f}" if t.daemon_cpu else ""
            print(f"{title:<15} {t.label:<32} {t.wall:>7.2f} {t.mib_s:>8.0f} {t.cpu:>7.2f} {daemon:>7} {ratio:>11}")
            title = ""
    print("(CPU s: user+sys of the command, plus the FUSE daemon's, shown apart under 'daemon'; "
          "rpfs speed: rpfs MiB/s / that row's)")
    print_encryption_cost(r)
    print_backup_summary(r)
    print_memory(r)
    print_references(r)
    print(f"checks: image through mount matches source: {yes_no(r.get('mount_image_matches'))}; "
          f"attach copy identical to source copy: {yes_no(r.get('copies_identical'))}; "
          f"restored image equals source (cmp): {yes_no(r.get('restore_matches'))}")


def yes_no(value) -> str:
    return {True: "yes", False: "NO", None: "not checked"}[value]


def print_backup_summary(r: dict) -> None:
    if "backup" not in r:
        return
    t = r["backup"]["rpfs"]
    s = t.extra["summary"]
    ratio = s["bytes_read"] / s["stored_bytes"] if s["stored_bytes"] else float("inf")
    nonzero = s["bytes_read"] - s["zero_bytes"]
    print(f"backup: stored {s['stored_bytes'] / MiB:.0f} MiB (store on disk {t.extra['store_disk_bytes'] / MiB:.0f} MiB)"
          f" for {s['bytes_read'] / MiB:.0f} MiB: ratio {ratio:.2f}x, {nonzero / max(s['stored_bytes'], 1):.2f}x of "
          f"non-zero data; new {s['new_bytes'] / MiB:.0f} MiB, dedup {s['deduplicated_bytes'] / MiB:.0f} MiB, "
          f"zero {s['zero_bytes'] / MiB:.0f} MiB; rpfs's own timer {s['seconds']:.2f} s")
    print(f"        the image holds {r['duplicate_copy_bytes'] / MiB:.0f} MiB of duplicate file copies; "
          f"rpfs deduplicated {s['deduplicated_bytes'] / MiB:.0f} MiB")


def print_encryption_cost(r: dict) -> None:
    """What encryption costs (the target: at most 10% of speed), from the runs taken in turns."""
    for step in ("backup", "read"):
        rows = r.get(step, {})
        if "rpfs unencrypted" in rows:
            enc, plain = rows["rpfs"], rows["rpfs unencrypted"]
            print(f"encryption, {step}: {enc.mib_s:.0f} MiB/s encrypted vs {plain.mib_s:.0f} unencrypted"
                  f" ({(1 - enc.mib_s / plain.mib_s) * 100:+.1f}% slower); CPU {enc.cpu:.2f} s vs {plain.cpu:.2f} s")


def print_memory(r: dict) -> None:
    for when in ("read", "copy"):
        m = r.get(f"daemon_after_{when}")
        if m and "VmHWM" in m:
            print(f"mount daemon after {when}: VmHWM {m['VmHWM']:.0f} MiB, RssAnon {m['RssAnon']:.0f} MiB, "
                  f"RssFile {m['RssFile']:.0f} MiB (LMDB map pages) (--cache-mb {m['cache_mb']})")


def print_references(r: dict) -> None:
    print("references (measured elsewhere), rpfs in this run:")
    for step, (name, low, high) in REFERENCES.items():
        if step not in r:
            continue
        ours = r[step]["rpfs"].mib_s
        figure = f"~{low}" if low == high else f"{low}-{high}"
        ratio = f"{ours / low:.2f}x" if low == high else f"{ours / high:.2f}-{ours / low:.2f}x"
        print(f"  {name:<34} {figure:>9} MiB/s   rpfs {ours:6.0f} MiB/s = {ratio}")


def results_json(ctx: Context) -> dict:
    out: dict = {"image": str(ctx.image), "image_bytes": ctx.image_bytes, "image_contents": ctx.about,
                 "repeat": ctx.repeat, "warm_gib": ctx.conditions.warm_gib, "cache_mb": ctx.cache_mb,
                 "rpfs_revision": git_revision(), "kernel": os.uname().release, "cpus": os.cpu_count(),
                 "references_mib_s": {k: {"name": n, "low": lo, "high": hi} for k, (n, lo, hi) in REFERENCES.items()},
                 "problems": ctx.problems}
    out.update(jsonable(ctx.results))
    return out


def jsonable(value):
    """Results as JSON: every Timing, however deep in dicts and lists, as its dict."""
    if isinstance(value, Timing):
        return value.as_dict()
    if isinstance(value, dict):
        return {key: jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def git_revision() -> str:
    try:
        return run(["git", "-C", str(REPO), "describe", "--always", "--dirty"]).strip()
    except (BenchError, FileNotFoundError):
        return "unknown"


# -- cleanup -----------------------------------------------------------------------------------------
def sweep(roots: list[Path], image: Path | None) -> list[str]:
    """Last resort after the context managers: unmount anything left below our dirs, free loop devices
    of our image; returns what had to be swept (each a bug in the bench or in rpfs detach/umount)."""
    swept = []
    for root in roots:
        for point in mounts_under(root):
            subprocess.run(["umount", "-l", point], capture_output=True)
            swept.append(f"mount {point}")
    markers = [str(r) for r in roots] + ([str(image)] if image else [])
    for line in run(["losetup", "-a"]).splitlines():
        if any(m in line for m in markers):
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)
            swept.append(f"loop device {line}")
    return swept


def leftovers(roots: list[Path], image: Path | None) -> list[str]:
    left = [p for root in roots for p in mounts_under(root)]
    loops = run(["losetup", "-a"]).splitlines()
    markers = [str(r) for r in roots] + ([str(image)] if image else [])
    left += [line for line in loops if any(m in line for m in markers)]
    return left


def remove_dir(path: Path) -> None:
    """rmtree, but never through a mount that is still there."""
    if mounts_under(path):
        print(f"bench: NOT removing {path}: something is still mounted below it", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


def check_daemon_logs(ctx: Context, run_dir: Path) -> None:
    """The mount daemons' logs must hold no errors (a read answered with EIO would still let cat fail,
    but a failing readahead might not)."""
    for log in sorted(run_dir.glob("*.log")):
        bad = [line for line in log.read_text(errors="replace").splitlines()
               if " ERROR " in line or "Traceback" in line or " WARNING " in line]
        if bad:
            ctx.problems.append(f"mount daemon log {log.name}: " + " | ".join(bad[:5]))
