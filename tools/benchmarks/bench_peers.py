"""rpfs next to its peers in tools/bench (issue 11): restic 0.14, borg 1.2 (its defaults, and fixed 4 MiB chunks)
and, for reads, a C passthrough FUSE (bindfs: the ceiling of FUSE here), doing the same jobs on the same image in
the same run; then rpfs's targets as ratios, PASS or MISS.

Where: the image is copied onto a reflink XFS (a sparse file beside the stores, on a loop device in direct I/O so
it is not cached twice), the one kind of filesystem where rpfs keeps a reflink snapshot and tracks changes. Every
tool backs up that copy into a repository beside the rpfs stores. All are encrypted: rpfs by default, restic
always, borg `repokey` (HMAC-SHA-256: this CPU has SHA instructions) or else `repokey-blake2`, whichever is the
faster here; passwords come from the environment. Compression is each tool's default: rpfs zstd 1, restic 0.14
`auto` (zstd), borg lz4.

Jobs, every tool in turns (with --repeat N, N turns and each tool's fastest run):
  full backup       into a fresh repository. Peak memory: max RSS from GNU time (anonymous and mapped pages
                    together) and anonymous memory (RssAnon summed over the command's processes, sampled every
                    50 ms: the kernel keeps no high-water mark of it)
  unchanged         rpfs only: how much the pages and records of its LMDB databases grow with a backup of the
                    unchanged image (scaled per TiB), and on a 1 TiB sparse disk (the target's figure)
  incremental       after ~1%, then ~5% more, of the image is overwritten through its ext4 mounted read-write
                    (random 4 KiB-aligned pieces of files, up to 1 MiB each, so every copy stays a sound
                    filesystem): rpfs with change tracking (kept reflink snapshot), rpfs by checksum (a second
                    store whose VM keeps none), restic and borg (they re-read a changed file whole). N turns are N
                    new changes
  store size        du of each repository after the full backup and after each incremental
  restore           cold (page cache dropped), then warm (right after), to a file beside the repositories, synced
                    (rpfs restore syncs its file); borg with --sparse, as rpfs writes holes (restic 0.14 has
                    no --sparse: it writes the zeros)
  cat               rpfs mount, restic mount, borg mount, bindfs of the image's folder: through a fresh mount cold,
                    then again in that mount (the kernel's cache of the mount), then through another fresh mount
                    warm (the repository's files cached; the daemon's and the mount's caches empty)
  loop device       on a fresh mount, the image on a read-only loop device (rpfs attach: direct I/O and a 1 MiB
                    read-ahead; the others losetup -r with the kernel's defaults), its ext4 mounted read-only:
                    cp -a of every file, then fio 4 KiB random reads with --direct=1, QD1 and QD16 (libaio)
  tracking target   rpfs only, a second image (--tracking-size-gib, 4 by default): full backup, a 1% change, the
                    tracked incremental; then once more with the page cache kept (as the figure in docs/dev/benchmarks.md was taken)
Copies, restored images and images read through the mounts are checked against the source (untimed).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lmdb
from bench_lib import (CLK_TCK, DISK, RPFS, GiB, MiB, BenchError, Context, Timing, attached, disk_usage, fresh_dir,
                       loop_mounted, metadata_listing, mounts_under, retry, rpfs, rpfs_mounted, run, source_image,
                       tree_size)

TiB = 1 << 40
KiB = 1 << 10
PACKAGES = {"time": "time", "fio": "fio"}   # GNU time, for max RSS
PEER_PACKAGES = {"restic": "restic", "borg": "borgbackup", "bindfs": "bindfs"}
CHANGES = (0.01, 0.05)          # the incremental steps, each on top of the last
TRACKING_CHANGE = 0.01
METADATA_DISK = TiB             # the sparse disk whose unchanged backup is measured
BORG_FIXED = "fixed,4194304"
COLUMNS = {"rpfs": "rpfs", "restic": "restic 0.14", "borg": "borg 1.2", "borg_fixed": "borg fixed 4 MiB"}


# -- installing the peers ----------------------------------------------------------------------------
def ensure_installed(peers: bool) -> None:
    """GNU time, fio and the peers (restic, borg with a FUSE binding for borg mount, bindfs) from Debian, the
    first time only."""
    wanted = {**PACKAGES, **(PEER_PACKAGES if peers else {})}
    missing = [package for binary, package in wanted.items() if shutil.which(binary) is None]
    if peers and subprocess.run(["/usr/bin/python3", "-c", "import pyfuse3"], capture_output=True).returncode != 0:
        missing.append("python3-pyfuse3")   # borg mount (Debian's borg runs on /usr/bin/python3)
    if not missing:
        return
    print(f"bench: installing {' '.join(missing)} with apt-get (once)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)   # the package lists may be stale
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(install)} failed: {proc.stderr.strip()[-500:]}")


def peer_environment(work: Path) -> None:
    """Passwords, caches and borg's home for this run, in our environment (the peers' processes inherit it)."""
    os.environ.update(RESTIC_PASSWORD=secrets.token_hex(16), BORG_PASSPHRASE=secrets.token_hex(16),
                      RESTIC_CACHE_DIR=str(work / "restic-cache"), BORG_BASE_DIR=str(work / "borg-home"))


def versions(peers: bool) -> dict:
    found = {"fio": run(["fio", "--version"]).strip()}
    if peers:
        found.update(restic=run(["restic", "version"]).split()[1], borg=run(["borg", "--version"]).split()[1],
                     bindfs=run(["bindfs", "--version"]).split()[1], borg_encryption=borg_encryption())
    return found


def borg_encryption() -> str:
    """borg's faster authenticated mode here: HMAC-SHA-256 where the CPU has SHA instructions, else BLAKE2b."""
    return "repokey" if " sha_ni" in Path("/proc/cpuinfo").read_text() else "repokey-blake2"


# -- measuring: processes, their CPU and their memory -------------------------------------------------
def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                queue.extend(int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split())
            except OSError:
                pass
    return found


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_cpu(pid: int | None) -> tuple[float, float]:
    """(user, sys) seconds of a daemon and the processes below it (an rpfs mount reads through child processes),
    with what its reaped children used."""
    if pid is None:
        return 0.0, 0.0
    user = system = 0.0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += (int(fields[11]) + int(fields[13])) / CLK_TCK
        system += (int(fields[12]) + int(fields[14])) / CLK_TCK
    return user, system


class PeakMemory:
    """The peak anonymous memory of a process and its descendants, sampled by a thread: the kernel keeps a
    high-water mark of the whole resident set only (VmHWM, which counts mapped files such as LMDB's too)."""

    INTERVAL = 0.05

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_anon = self.peak_hwm = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        pids = descendants(self.pid)
        self.peak_anon = max(self.peak_anon, sum(status_kib(p, "RssAnon") for p in pids) * KiB)
        self.peak_hwm = max(self.peak_hwm, status_kib(self.pid, "VmHWM") * KiB)
        self.processes = max(self.processes, len(pids))

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict:
        return {"peak_anon_mib": round(self.peak_anon / MiB, 1), "vm_hwm_mib": round(self.peak_hwm / MiB, 1),
                "processes": self.processes}


def run_measured(label: str, cmd: list[str], nbytes: int, daemon_pid: int | None = None, cwd: Path | None = None,
                 capture: bool = False) -> tuple[Timing, str]:
    """bench_lib.run_timed, plus the command's peak memory: its max RSS as GNU time reports it, and the peak
    anonymous memory of its processes (PeakMemory); a daemon's CPU counts its child processes too. GNU time, not
    our own wait4: a child forked from this (large) process would count our resident pages until its exec."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as max_rss:
        daemon_before = tree_cpu(daemon_pid)
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", max_rss.name, *cmd],
                                stdout=out if capture else subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, cwd=cwd)
        try:
            with PeakMemory(proc.pid) as memory:
                _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        daemon_after = tree_cpu(daemon_pid)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        max_rss_kib = int(max_rss.read().split()[-1]) if proc.returncode == 0 else 0
    if proc.returncode != 0:
        raise BenchError(f"{label}: {' '.join(map(str, cmd))} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    timing = Timing(label, nbytes, wall, usage.ru_utime, usage.ru_stime,
                    daemon_after[0] - daemon_before[0], daemon_after[1] - daemon_before[1])
    timing.extra.update(max_rss_mib=round(max_rss_kib / KiB, 1), peak_anon_mib=round(memory.peak_anon / MiB, 1))
    return timing, stdout


def measured(ctx: Context, label: str, cmd: list[str], nbytes: int | None = None, drop: bool = True,
             **kw) -> tuple[Timing, str]:
    """Context.timed with run_measured: sync, drop the page cache unless warm, touch memory, run."""
    ctx.conditions.prepare(drop)
    print(f"bench:   {label}", flush=True)
    return run_measured(label, [str(c) for c in cmd], ctx.image_bytes if nbytes is None else nbytes, **kw)


def best_runs(runs: dict[str, list[Timing]]) -> dict[str, Timing]:
    """Each one's best run (the most MiB/s, which for fio is the most IOPS), with every run's wall time."""
    best = {}
    for key, timings in runs.items():
        best[key] = max(timings, key=lambda t: t.mib_s)
        if len(timings) > 1:
            best[key].extra["all_walls"] = [round(t.wall, 3) for t in timings]
    return best


def turns(repeat: int, steps: dict[str, Callable[[], dict[str, Timing]]]) -> dict[str, dict[str, Timing]]:
    """bench_lib.best_in_turns for steps that measure several things a run (cold, then warm): per measure, the
    best run of each step."""
    runs: dict[str, dict[str, list[Timing]]] = {}
    for _ in range(repeat):
        for key, once in steps.items():
            for measure, timing in once().items():
                runs.setdefault(measure, {}).setdefault(key, []).append(timing)
    return {measure: best_runs(by_key) for measure, by_key in runs.items()}


# -- mounts and loop devices, each undone on the way out ----------------------------------------------
def wait_for(ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline, delay = time.monotonic() + timeout, 0.05
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


@contextmanager
def xfs_mounted(backing: Path, mountpoint: Path, size: int) -> Iterator[Path]:
    """A reflink XFS on a sparse file, through a loop device in direct I/O (its data is not cached twice)."""
    with open(backing, "wb") as f:
        f.truncate(size)
    try:
        run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)])
        device = run(["losetup", "--direct-io=on", "-f", "--show", str(backing)]).strip()
        try:
            mountpoint.mkdir(parents=True, exist_ok=True)
            run(["mount", "-t", "xfs", device, str(mountpoint)])
            try:
                yield mountpoint
            finally:
                retry(lambda: run(["umount", str(mountpoint)]), f"umount {mountpoint}")
        finally:
            retry(lambda: run(["losetup", "-d", device]), f"losetup -d {device}")
    finally:
        backing.unlink(missing_ok=True)


@contextmanager
def fuse_daemon(cmd: list[str], mountpoint: Path, image: Path, log: Path) -> Iterator[int]:
    """A FUSE daemon in the foreground as our child (in its own session: a Ctrl-C unwinds us, and we unmount it);
    yields its pid once `image` shows in the mount; unmounts and waits for it on the way out."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or exists(image), f"{cmd[0]} to mount {image}")
        if proc.returncode is not None:
            raise BenchError(f"{' '.join(map(str, cmd))} exited ({proc.returncode}): "
                             f"{log.read_text(errors='replace').strip()[-500:]}")
        yield proc.pid
    finally:
        if str(mountpoint) in mounts_under(mountpoint):
            retry(lambda: run(["umount", str(mountpoint)]), f"umount {mountpoint}")
        stop(proc)


def exists(path: Path) -> bool:
    """Path.exists, and False for a mount that is not answering yet."""
    try:
        return path.exists()
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """Wait for a daemon whose mount is gone to exit; end it if it does not."""
    for ask in (None, proc.terminate, proc.kill):
        if ask is not None:
            ask()
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            print(f"bench: pid {proc.pid} ({proc.args[0]}) did not exit", flush=True)


@contextmanager
def ro_loop(image: Path, mountpoint: Path) -> Iterator[tuple[str, Path]]:
    """The image on a read-only loop device (losetup -r, the kernel's defaults) and its ext4 mounted read-only;
    yields the device and the mountpoint."""
    device = run(["losetup", "-r", "-f", "--show", str(image)]).strip()
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "ext4", "-o", "ro,noload", device, str(mountpoint)])
        try:
            yield device, mountpoint
        finally:
            retry(lambda: run(["umount", str(mountpoint)]), f"umount {mountpoint}")
    finally:
        retry(lambda: run(["losetup", "-d", device]), f"losetup -d {device}")


# -- the tools ---------------------------------------------------------------------------------------
class Tool:
    """One tool doing rpfs's jobs: how it makes a repository, backs up, restores and mounts."""

    key: str
    title: str
    repo: Path
    source: Path

    def fresh(self) -> None:
        """An empty repository."""
        raise NotImplementedError

    def backup_cmd(self, source: Path) -> list:
        raise NotImplementedError

    def backed_up(self, timing: Timing, out: str) -> None:
        """What the backup printed, worth keeping."""

    def restore_cmd(self, dest: Path) -> tuple[list, Path | None]:
        """The command restoring the latest backup into the folder dest, and the folder to run it in."""
        raise NotImplementedError

    def mounted(self, ctx: Context, mountpoint: Path) -> Iterator[tuple[int, Path]]:
        """The latest backup mounted: the serving daemon's pid, the image in the mount."""
        raise NotImplementedError

    @contextmanager
    def loop(self, image: Path, dest: Path) -> Iterator[tuple[str, Path]]:
        with ro_loop(image, dest / "disk") as found:
            yield found


class RpfsTool(Tool):
    def __init__(self, key: str, title: str, store: Path, vm: str, keep_snapshot: bool):
        self.key, self.title, self.repo, self.vm, self.keep = key, title, store, vm, keep_snapshot

    def fresh(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        rpfs(self.repo, "init")

    def backup_cmd(self, source: Path) -> list:
        keep = ["--keep-snapshot-days", "1"] if self.keep else []
        return [RPFS, "--store", self.repo, "backup", self.vm, "--disk", f"{DISK}={source}", "--json", *keep]

    def backed_up(self, timing: Timing, out: str) -> None:
        summary = json.loads(out)
        disk = summary["recovery_point"]["disks"][0]
        timing.extra["summary"] = {key: summary.get(key) for key in
                                   ("bytes_read", "new_bytes", "deduplicated_bytes", "zero_bytes", "stored_bytes",
                                    "unchanged_bytes", "disk_bytes_read", "seconds")}
        timing.extra.update(change_tracking=disk.get("change_tracking"), read_bytes=disk.get("read_bytes"))

    def restore_cmd(self, dest: Path) -> tuple[list, Path | None]:
        return [RPFS, "--store", self.repo, "restore", self.vm, "--disk", DISK, "--to", dest / f"{DISK}.img"], None

    @contextmanager
    def mounted(self, ctx: Context, mountpoint: Path) -> Iterator[tuple[int, Path]]:
        with rpfs_mounted(self.repo, mountpoint, ctx.cache_mb) as pid:
            yield pid, mountpoint / self.vm / "latest" / f"{DISK}.img"

    @contextmanager
    def loop(self, image: Path, dest: Path) -> Iterator[tuple[str, Path]]:
        with attached(image, dest) as fs:
            yield run(["findmnt", "-n", "-o", "SOURCE", str(fs)]).strip(), fs


class ResticTool(Tool):
    key, title = "restic", "restic"

    def __init__(self, repo: Path):
        self.repo = repo

    def fresh(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        run(["restic", "-r", str(self.repo), "init"])

    def backup_cmd(self, source: Path) -> list:
        self.source = source
        return ["restic", "-r", self.repo, "backup", "--quiet", source]

    def restore_cmd(self, dest: Path) -> tuple[list, Path | None]:
        return ["restic", "-r", self.repo, "restore", "latest", "--target", dest], None   # 0.14 has no --sparse

    @contextmanager
    def mounted(self, ctx: Context, mountpoint: Path) -> Iterator[tuple[int, Path]]:
        image = mountpoint / "snapshots" / "latest" / str(self.source).lstrip("/")
        with fuse_daemon(["restic", "-r", self.repo, "mount", mountpoint], mountpoint, image,
                         ctx.work / "restic-mount.log") as pid:
            yield pid, image


class BorgTool(Tool):
    def __init__(self, key: str, title: str, repo: Path, chunker: str | None = None):
        self.key, self.title, self.repo, self.chunker = key, title, repo, chunker
        self.archives = 0

    @property
    def latest(self) -> str:
        return f"{self.repo}::p{self.archives}"

    def fresh(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        run(["borg", "init", "--encryption", borg_encryption(), str(self.repo)])
        self.archives = 0

    def backup_cmd(self, source: Path) -> list:
        self.source = source
        self.archives += 1
        chunker = ["--chunker-params", self.chunker] if self.chunker else []
        return ["borg", "create", *chunker, self.latest, source]

    def restore_cmd(self, dest: Path) -> tuple[list, Path | None]:
        return ["borg", "extract", "--sparse", self.latest], dest

    @contextmanager
    def mounted(self, ctx: Context, mountpoint: Path) -> Iterator[tuple[int, Path]]:
        image = mountpoint / str(self.source).lstrip("/")   # borg keeps the path, less its leading slash
        with fuse_daemon(["borg", "mount", "-f", self.latest, mountpoint], mountpoint, image,
                         ctx.work / f"{self.key}-mount.log") as pid:
            yield pid, image


class Bindfs(Tool):
    """A C passthrough FUSE of the image's folder: what FUSE itself allows here."""

    key, title = "bindfs", "bindfs"

    def __init__(self, folder: Path, source: Path):
        self.folder, self.source = folder, source

    @contextmanager
    def mounted(self, ctx: Context, mountpoint: Path) -> Iterator[tuple[int, Path]]:
        image = mountpoint / self.source.name
        with fuse_daemon(["bindfs", "-f", "-r", self.folder, mountpoint], mountpoint, image,
                         ctx.work / "bindfs.log") as pid:
            yield pid, image


# -- changing the image, measuring the store ----------------------------------------------------------
def change_files(image: Path, mountpoint: Path, fraction: float, rng: random.Random) -> int:
    """Overwrite about `fraction` of the image in place, as a VM would: through its ext4 mounted read-write,
    random 4 KiB-aligned pieces (up to 1 MiB) of its files, with random data; returns the bytes written."""
    target, written = int(image.stat().st_size * fraction), 0
    with loop_mounted(image, mountpoint, "rw") as fs:
        files = [(os.path.join(d, n), os.lstat(os.path.join(d, n)).st_size) for d, _, names in os.walk(fs)
                 for n in names]
        files = [(path, size) for path, size in files if size >= 4096]
        weights = [size for _, size in files]
        while written < target:
            path, size = rng.choices(files, weights)[0]
            offset = rng.randrange(size // 4096) * 4096
            length = min(MiB, size - offset, target - written)
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(os.urandom(length))
            written += length
    os.utime(image)   # as a hypervisor's writes would; restic and borg see a changed file by it
    return written


def lmdb_usage(store: Path) -> tuple[int, int]:
    """What the records of a store take up, whatever its file's size: bytes in the pages of all its LMDB databases
    (branch, leaf and overflow pages, not free ones), and bytes of the keys and values of those holding metadata
    (exact, where a record that fits in a page's slack adds no page). A database whose values average 256 KiB or
    more holds block payloads, data: it is not walked, which would read the whole store. Read while no backup runs."""
    env = lmdb.open(str(store), readonly=True, lock=False, max_dbs=256, subdir=True)
    try:
        stat = env.stat()
        used, records = pages(stat), 0
        with env.begin(buffers=True) as txn:
            for name in [bytes(key) for key, _ in txn.cursor()]:
                try:
                    db = env.open_db(name, txn=txn, create=False)
                except lmdb.Error:
                    continue   # a key of the main database that names no database
                db_stat = txn.stat(db)
                used += pages(db_stat)
                if db_stat["overflow_pages"] < 64 * db_stat["entries"]:
                    records += sum(len(key) + len(value) for key, value in txn.cursor(db))
        return used * stat["psize"], records
    finally:
        env.close()


def pages(stat: dict) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def find_file(root: Path, name: str) -> Path:
    found = list(root.rglob(name))
    if len(found) != 1:
        raise BenchError(f"expected one {name} below {root}, found {found}")
    return found[0]


def sha256(path: Path) -> str:
    return run(["sha256sum", str(path)]).split()[0]


def synced(cmd: list, dest: Path) -> list:
    """cmd, then an fsync of every file it wrote below dest (rpfs restore syncs its file; the others do not)."""
    return ["sh", "-c", '"$@" && find "$0" -type f -exec sync -- {} +', dest, *cmd]


# -- the steps ---------------------------------------------------------------------------------------
def run_steps(ctx: Context) -> None:
    """The peers, then rpfs's own targets (change tracking, metadata of an unchanged disk), all on one reflink
    XFS, removed at the end."""
    ensure_installed(ctx.peers)
    if ctx.peers:
        peer_environment(ctx.work)
    ctx.results["versions"] = versions(ctx.peers)
    tracking_image = None
    if ctx.tracking_gib > 0:
        tracking_image, _ = source_image(ctx.cache_dir, ctx.tracking_gib, False)
    tracking_bytes = tracking_image.stat().st_size if tracking_image else 0
    size = int((ctx.image_bytes + tracking_bytes) * 1.5) + 4 * GiB
    with xfs_mounted(ctx.work / "xfs.img", ctx.work / "xfs", size) as xfs:
        step_peers(ctx, xfs)
        if tracking_image:
            step_tracking(ctx, xfs, tracking_image)
        step_metadata(ctx, xfs)


def step_peers(ctx: Context, xfs: Path) -> None:
    """Every tool on a copy of the image: the backups (which change it), then the reads of the last backup."""
    print("bench: rpfs and its peers", flush=True)
    folder = xfs / "peers"
    folder.mkdir()
    source = folder / f"{DISK}.img"
    run(["cp", "--sparse=never", str(ctx.image), str(source)])
    tracked = RpfsTool("rpfs", "rpfs", ctx.work / "store-tracked", "benchvm", keep_snapshot=True)
    checksum = RpfsTool("rpfs_checksum", "rpfs by checksum", ctx.work / "store-checksum", "benchref", False)
    tools: list[Tool] = [tracked, checksum]
    if ctx.peers:
        tools += [ResticTool(ctx.work / "restic"), BorgTool("borg", "borg", ctx.work / "borg"),
                  BorgTool("borg_fixed", "borg fixed 4 MiB", ctx.work / "borg-fixed", BORG_FIXED)]
    r: dict = {"source": str(source), "repeat": ctx.repeat}
    ctx.results["peers"] = r
    try:
        backup_jobs(ctx, r, tools, source)
        readers = {"rpfs": checksum, **{t.key: t for t in tools[2:]}}   # rpfs: the store without kept snapshots
        read_jobs(ctx, r, readers, folder, source)
    finally:
        for tool in tools:   # nothing later needs them: give the space back
            shutil.rmtree(tool.repo, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def backup_jobs(ctx: Context, r: dict, tools: list[Tool], source: Path) -> None:
    """Full backups, rpfs's backup of the unchanged image, incrementals after each change; store sizes."""
    r["full_backup"] = turns(ctx.repeat, {t.key: full_backup_once(ctx, t, source) for t in tools})["full"]
    r["full_backup_fast_source"] = fast_source_backup(ctx, source)
    r["store_bytes"] = {"full": {t.key: disk_usage(t.repo) for t in tools}}
    r["unchanged"] = unchanged_backup(ctx, tools[0], source)
    for fraction in CHANGES:
        name = f"incremental_{fraction * 100:.0f}"
        r[name] = incremental(ctx, tools, source, fraction, ctx.work / "change")
        r["store_bytes"][name] = {t.key: disk_usage(t.repo) for t in tools}


def read_jobs(ctx: Context, r: dict, readers: dict[str, Tool], folder: Path, source: Path) -> None:
    """Restores, cat through the mounts, and the loop device on each mount (bindfs too, but for restores)."""
    digest = sha256(source)
    r.update(turns(ctx.repeat, {key: restore_once(ctx, key, tool, digest) for key, tool in readers.items()}))
    if ctx.peers:
        readers = {**readers, "bindfs": Bindfs(folder, source)}
    r.update(turns(ctx.repeat, {key: cat_once(ctx, key, tool, digest) for key, tool in readers.items()}))
    reference = ctx.scratch / "out-reference"
    with loop_mounted(source, ctx.work / "source-peers") as fs:   # what every copy must equal
        fresh_dir(reference)
        run(["cp", "-a", f"{fs}/.", f"{reference}/"])
        r["copy_bytes"], r["copy_files"] = tree_size(fs)
    try:
        r.update(turns(ctx.repeat, {key: loop_once(ctx, key, tool, reference, r["copy_bytes"])
                                    for key, tool in readers.items()}))
    finally:
        shutil.rmtree(reference)


def full_backup_once(ctx: Context, tool: Tool, source: Path) -> Callable[[], dict[str, Timing]]:
    def once() -> dict[str, Timing]:
        tool.fresh()
        return {"full": backup(ctx, tool, source, "full backup")}
    return once


def backup(ctx: Context, tool: Tool, source: Path, what: str, drop: bool = True) -> Timing:
    timing, out = measured(ctx, f"{tool.title} {what}", tool.backup_cmd(source), source.stat().st_size, drop=drop,
                           capture=True)
    tool.backed_up(timing, out)
    return timing


def fast_source_backup(ctx: Context, source: Path) -> Timing:
    """rpfs's full backup of the image copied to tmpfs: a source that reads faster than the backup hashes,
    for the target that it then keeps both cores busy (from the disk, reads behind the store's flushes bound it)."""
    fast = ctx.scratch / source.name
    tool = RpfsTool("rpfs_fast_source", "rpfs", ctx.work / "store-fast-source", "benchfast", keep_snapshot=False)
    run(["cp", "--sparse=never", str(source), str(fast)])
    try:
        return turns(ctx.repeat, {tool.key: full_backup_once(ctx, tool, fast)})["full"][tool.key]
    finally:
        fast.unlink()
        shutil.rmtree(tool.repo, ignore_errors=True)


def unchanged_backup(ctx: Context, tool: Tool, source: Path) -> dict:
    """What a backup of the unchanged image adds to the store: LMDB pages, bytes of records, du. Per TiB: the
    larger of pages and records, scaled from the image's size."""
    (pages_before, records_before), du_before = lmdb_usage(tool.repo), disk_usage(tool.repo)
    timing = backup(ctx, tool, source, "backup of the unchanged image")
    pages_after, records_after = lmdb_usage(tool.repo)
    added = max(pages_after - pages_before, records_after - records_before)
    return {"timing": timing, "lmdb_pages_added_bytes": pages_after - pages_before,
            "lmdb_records_added_bytes": records_after - records_before,
            "du_added_bytes": disk_usage(tool.repo) - du_before, "added_per_tib": added * TiB // source.stat().st_size}


def incremental(ctx: Context, tools: list[Tool], source: Path, fraction: float, mountpoint: Path) -> dict:
    """Per turn a new change of the image, then every tool's incremental backup."""
    runs: dict[str, list[Timing]] = {t.key: [] for t in tools}
    written = []
    for turn in range(ctx.repeat):
        written.append(change_files(source, mountpoint, fraction, random.Random(f"{fraction}/{turn}")))
        for tool in tools:
            runs[tool.key].append(backup(ctx, tool, source, f"incremental after {fraction:.0%} changed"))
    return {"fraction": fraction, "written_bytes": written, "timings": best_runs(runs)}


def restore_once(ctx: Context, key: str, tool: Tool, digest: str) -> Callable[[], dict[str, Timing]]:
    """A full restore with the page cache dropped, then again with the repository cached; the image must equal
    the source."""
    def once() -> dict[str, Timing]:
        dest, found = ctx.work / f"restore-{key}", {}
        try:
            for kind in ("cold", "warm"):
                fresh_dir(dest)
                cmd, cwd = tool.restore_cmd(dest)
                found[f"restore_{kind}"] = measured(ctx, f"{tool.title} restore ({kind})", synced(cmd, dest),
                                                    drop=kind == "cold", cwd=cwd)[0]
            check(ctx, f"{tool.title} restore", sha256(find_file(dest, f"{DISK}.img")) == digest)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return found
    return once


def cat_once(ctx: Context, key: str, tool: Tool, digest: str) -> Callable[[], dict[str, Timing]]:
    """cat of the image through a fresh mount: cold (page cache dropped), then again in the same mount (what the
    kernel's cache of the mount keeps); then through another fresh mount, warm (the repository's files cached, the
    daemon and the mount's cache empty). The daemon's memory meanwhile."""
    def once() -> dict[str, Timing]:
        mountpoint, label = ctx.work / f"mnt-{key}", f"cat through {tool.title} mount"
        with tool.mounted(ctx, mountpoint) as (pid, image), PeakMemory(pid) as memory:
            cold = measured(ctx, f"{label} (cold)", ["cat", image], daemon_pid=pid)[0]
            again = measured(ctx, f"{label} (again, same mount)", ["cat", image], daemon_pid=pid, drop=False)[0]
            check(ctx, f"image through the {tool.title} mount", sha256(image) == digest)
        with tool.mounted(ctx, mountpoint) as (pid, image), PeakMemory(pid) as warm_memory:
            warm = measured(ctx, f"{label} (warm, fresh mount)", ["cat", image], daemon_pid=pid, drop=False)[0]
        cold.extra["daemon_memory"], warm.extra["daemon_memory"] = memory.as_dict(), warm_memory.as_dict()
        return {"cat_cold": cold, "cat_again": again, "cat_warm": warm}
    return once


def loop_once(ctx: Context, key: str, tool: Tool, reference: Path, nbytes: int) -> Callable[[], dict[str, Timing]]:
    """Through a fresh mount, the image on a read-only loop device with its ext4 mounted: cp -a of every file,
    then fio random reads of the device; the daemon's memory meanwhile."""
    def once() -> dict[str, Timing]:
        out = ctx.scratch / f"out-{key}"
        fresh_dir(out)
        try:
            with tool.mounted(ctx, ctx.work / f"mnt-{key}") as (pid, image), PeakMemory(pid) as memory, \
                    tool.loop(image, ctx.work / f"loop-{key}") as (device, fs):
                copy = measured(ctx, f"cp -a via a loop device on the {tool.title} mount",
                                ["cp", "-a", f"{fs}/.", f"{out}/"], nbytes, daemon_pid=pid)[0]
                found = {"copy": copy}
                if key == "bindfs":   # the ceiling also with the page cache cp -a left (rpfs's loop device has none)
                    found.update({f"fio_qd{depth}_warm": fio(ctx, tool, device, depth, pid, drop=False)
                                  for depth in (1, 16)})
                found.update({f"fio_qd{depth}": fio(ctx, tool, device, depth, pid) for depth in (1, 16)})
            copy.extra["daemon_memory"] = memory.as_dict()
            check(ctx, f"files copied through the {tool.title} mount", same_trees(out, reference))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return found
    return once


def fio(ctx: Context, tool: Tool, device: str, depth: int, pid: int, drop: bool = True) -> Timing:
    """4 KiB random reads of the loop device for --fio-seconds (wall: fio's runtime, so MiB/s follows IOPS); the
    same offsets every run (fio's fixed seed)."""
    cmd = ["fio", "--name=randread", f"--filename={device}", "--readonly", "--direct=1", "--rw=randread", "--bs=4k",
           "--ioengine=libaio", f"--iodepth={depth}", "--time_based", f"--runtime={ctx.fio_seconds}",
           "--output-format=json"]
    label = f"fio 4 KiB random reads QD{depth} via the {tool.title} mount" + ("" if drop else " (warm)")
    timing, out = measured(ctx, label, cmd, 0, drop=drop, daemon_pid=pid, capture=True)
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    timing.nbytes, timing.wall = job["io_bytes"], job["runtime"] / 1000
    clat = job["clat_ns"]
    timing.extra.update(iops=round(job["iops"]), mean_ms=round(clat["mean"] / 1e6, 3),
                        p99_ms=round(clat.get("percentile", {}).get("99.000000", 0) / 1e6, 3))
    return timing


def same_trees(a: Path, b: Path) -> bool:
    diff = subprocess.run(["diff", "-r", "-q", "--no-dereference", str(a), str(b)], capture_output=True)
    return diff.returncode == 0 and metadata_listing(a) == metadata_listing(b)


def check(ctx: Context, what: str, ok: bool) -> None:
    ctx.results.setdefault("peer_checks", {})[what] = ok
    if not ok:
        ctx.problems.append(f"MISMATCH: {what} differs from the source")


def step_tracking(ctx: Context, xfs: Path, image: Path) -> None:
    """rpfs's change-tracking target: after a 1% change of a (4 GiB) image, its tracked incremental takes at most
    5% of the full backup's time."""
    print(f"bench: change tracking on a {image.stat().st_size / GiB:.1f} GiB image", flush=True)
    folder = xfs / "tracking"
    folder.mkdir()
    source = folder / f"{DISK}.img"
    run(["cp", "--sparse=never", str(image), str(source)])
    tool = RpfsTool("rpfs", "rpfs", ctx.work / "store-tracking", "benchct", keep_snapshot=True)
    try:
        full = turns(ctx.repeat, {"rpfs": full_backup_once(ctx, tool, source)})["full"]["rpfs"]
        step = incremental(ctx, [tool], source, TRACKING_CHANGE, ctx.work / "change")
        written = change_files(source, ctx.work / "change", TRACKING_CHANGE, random.Random("warm"))
        warm = backup(ctx, tool, source, "incremental, page cache kept", drop=False)   # as docs/dev/benchmarks.md measured
        ctx.results["tracking"] = {"image_bytes": source.stat().st_size, "full": full, **step,
                                   "warm": {"written_bytes": written, "timing": warm}}
    finally:
        shutil.rmtree(tool.repo, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def step_metadata(ctx: Context, xfs: Path) -> None:
    """What a backup of an unchanged disk adds to the store, on a 1 TiB sparse disk with 1 MiB of random data at
    every GiB (so no two pieces of its block map are alike)."""
    print("bench: metadata of a backup of an unchanged 1 TiB disk", flush=True)
    folder = xfs / "metadata"
    folder.mkdir()
    disk = folder / f"{DISK}.img"
    with open(disk, "wb") as f:
        f.truncate(METADATA_DISK)
        for offset in range(0, METADATA_DISK, GiB):
            f.seek(offset)
            f.write(os.urandom(MiB))
    tool = RpfsTool("rpfs", "rpfs", ctx.work / "store-metadata", "benchmeta", keep_snapshot=True)
    try:
        tool.fresh()
        first = backup(ctx, tool, disk, "full backup of a 1 TiB sparse disk")
        found = unchanged_backup(ctx, tool, disk)
        ctx.results["metadata"] = {"disk_bytes": METADATA_DISK, "data_bytes": METADATA_DISK // GiB * MiB,
                                   "full": first, **found}
    finally:
        shutil.rmtree(tool.repo, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


# -- targets and the report --------------------------------------------------------------------------
@dataclass
class Target:
    """One target of issues 11 and 25 as a ratio in this run."""

    name: str
    detail: str
    ratio: float
    limit: float
    at_most: bool = False   # the ratio must not exceed the limit (else: reach it)

    @property
    def passed(self) -> bool:
        return self.ratio <= self.limit if self.at_most else self.ratio >= self.limit

    def as_dict(self) -> dict:
        return {"name": self.name, "detail": self.detail, "ratio": round(self.ratio, 4), "limit": self.limit,
                "at_most": self.at_most, "passed": self.passed}


def targets(ctx: Context) -> list[Target]:
    r, found = ctx.results.get("peers", {}), []
    t = Target

    def faster(job: str, peer: str, limit: float, name: str, ours: str = "rpfs") -> None:
        rows = r.get(job, {})
        if ours in rows and peer in rows:
            a, b = rows[ours], rows[peer]
            found.append(t(name, f"{a.mib_s:.0f} vs {b.mib_s:.0f} MiB/s", a.mib_s / b.mib_s, limit))

    faster("full_backup", "borg", 2.0, "full backup >= 2x borg's default")
    faster("full_backup", "borg_fixed", 1.5, "full backup >= 1.5x borg with fixed 4 MiB chunks")
    full = r.get("full_backup", {})
    if "rpfs" in full:
        ours = full["rpfs"]
        for peer in ("borg", "borg_fixed"):
            if peer in full:
                found.append(t(f"full backup: less CPU than {peer.replace('_', ' ')}", f"{ours.cpu:.2f} vs "
                               f"{full[peer].cpu:.2f} CPU s", ours.cpu / full[peer].cpu, 1.0, at_most=True))
    fast = r.get("full_backup_fast_source")
    if fast:
        found.append(t("full backup of a source faster than hashing (tmpfs) keeps both cores busy: CPU s / wall s"
                       " >= 1.7", f"{fast.cpu:.2f} / {fast.wall:.2f} s", fast.cpu / fast.wall, 1.7))
    tracking = ctx.results.get("tracking")
    if tracking:
        inc, full = tracking["timings"]["rpfs"], tracking["full"]
        found.append(t(f"tracked incremental after 1% of {tracking['image_bytes'] / GiB:.1f} GiB <= 5% of the full",
                       f"{inc.wall:.2f} s vs {full.wall:.2f} s", inc.wall / full.wall, 0.05, at_most=True))
        warm = tracking["warm"]["timing"]
        found.append(t("  the same with the page cache kept", f"{warm.wall:.2f} s vs {full.wall:.2f} s",
                       warm.wall / full.wall, 0.05, at_most=True))
    for fraction in CHANGES:
        rows = r.get(f"incremental_{fraction * 100:.0f}", {}).get("timings", {})
        if "rpfs_checksum" in rows and "borg_fixed" in rows:
            a, b = rows["rpfs_checksum"], rows["borg_fixed"]
            found.append(t(f"incremental by checksum ({fraction:.0%}) faster than borg fixed 4 MiB",
                           f"{a.wall:.2f} s vs {b.wall:.2f} s", b.wall / a.wall, 1.0))
    metadata = ctx.results.get("metadata") or r.get("unchanged")
    if metadata:
        per_tib = metadata["added_per_tib"]
        found.append(t("unchanged disk adds < 64 KiB of metadata per TiB", f"{per_tib / KiB:.1f} KiB per TiB",
                       per_tib / (64 * KiB), 1.0, at_most=True))
    sizes = r.get("store_bytes", {})
    if sizes and "borg" in sizes["full"]:
        last = list(sizes)[-1]
        a, b = sizes[last]["rpfs"], sizes[last]["borg"]
        found.append(t("store <= borg's size", f"{a / MiB:.0f} vs {b / MiB:.0f} MiB", a / b, 1.0, at_most=True))
    for kind in ("warm", "cold"):
        faster(f"cat_{kind}", "borg", 1.5, f"cat through the mount ({kind}) >= 1.5x borg's mount")
        faster(f"cat_{kind}", "bindfs", 0.3, f"cat through the mount ({kind}) >= 30% of bindfs's")
    faster("copy", "restic", 3.0, "files via loop on the mount >= 3x restic's")
    faster("copy", "bindfs", 0.7, "files via loop on the mount >= 70% of bindfs's")
    for depth in (1, 16):
        for warm in ("", "_warm"):
            rows, bindfs = r.get(f"fio_qd{depth}", {}), r.get(f"fio_qd{depth}{warm}", {})
            if "rpfs" in rows and "bindfs" in bindfs:
                a, b = rows["rpfs"].extra["iops"], bindfs["bindfs"].extra["iops"]
                found.append(t(f"random 4 KiB reads QD{depth} >= 35% of bindfs's IOPS"
                               + (" (its page cache kept)" if warm else ""), f"{a} vs {b} IOPS", a / b, 0.35))
    for kind in ("warm", "cold"):
        faster(f"restore_{kind}", "borg", 1.5, f"full restore ({kind}) >= 1.5x borg's")
    backups = rpfs_backups(ctx)
    if backups:
        top = max(backups, key=lambda b: b.extra["peak_anon_mib"])
        peak = top.extra["peak_anon_mib"]
        found.append(t("peak anonymous memory of a backup <= 256 MiB", f"{peak:.0f} MiB ({top.label})", peak / 256,
                       1.0, at_most=True))
    daemon = rpfs_daemon_peak(r)
    if daemon:
        limit = ctx.cache_mb + 64
        found.append(t(f"mount daemon <= cache + 64 MiB ({limit} MiB), anonymous", f"{daemon:.0f} MiB",
                       daemon / limit, 1.0, at_most=True))
    return found


def rpfs_backups(ctx: Context) -> list[Timing]:
    r = ctx.results
    found = [r["peers"]["full_backup"][key] for key in ("rpfs", "rpfs_checksum") if key in r.get("peers", {})
             .get("full_backup", {})]
    found += [r[step]["full"] for step in ("tracking", "metadata") if step in r]
    return found


def rpfs_daemon_peak(r: dict) -> float:
    return max((r[job]["rpfs"].extra.get("daemon_memory", {}).get("peak_anon_mib", 0)
                for job in ("cat_cold", "cat_warm", "copy") if "rpfs" in r.get(job, {})), default=0.0)


def print_report(ctx: Context) -> None:
    """The table, rpfs's own figures, the checks and the targets (kept in the results too, for --json)."""
    r = ctx.results.get("peers")
    if r:
        print_table(ctx, r)
    print_rpfs_only(ctx)
    checks = ctx.results.get("peer_checks", {})
    if checks:
        bad = [what for what, ok in checks.items() if not ok]
        print(f"checks: {len(checks) - len(bad)} of {len(checks)} images, restores and copies equal the source"
              + (f"; NOT: {', '.join(bad)}" if bad else ""))
    found = targets(ctx)
    ctx.results["targets"] = [target.as_dict() for target in found]
    if found:
        print("targets (issues 11 and 25), as ratios in this run:")
        for target in found:
            sign = "<=" if target.at_most else ">="
            print(f"  {target.name:<72} {target.ratio:7.3f} {sign} {target.limit:<5} "
                  f"{'PASS' if target.passed else 'MISS'}   {target.detail}")


def print_table(ctx: Context, r: dict) -> None:
    cols = [key for key in COLUMNS if key in r.get("full_backup", {})]
    width, job_width = 19, 48
    print()
    peers = (f", restic (auto = zstd), borg {ctx.results['versions']['borg_encryption']} (lz4)" if "borg" in cols
             else "")
    print(f"rpfs and its peers: the image on a reflink XFS, repositories on {ctx.work.parent}, best of {ctx.repeat}; "
          f"encrypted, each tool's default compression: rpfs (zstd 1){peers}")
    header = f"{'job':<{job_width}}" + "".join(f"{COLUMNS[c]:>{width}}" for c in cols) + "   ceiling"
    print(header)
    print("-" * len(header))

    def row(job: str, cell: Callable[[str], str], ceiling: str = "") -> None:
        cells = []
        for col in cols:
            try:
                cells.append(cell(col))
            except (KeyError, ZeroDivisionError):
                cells.append("")
        if not any(cells) and not ceiling:
            return   # a step that did not run
        print(f"{job:<{job_width}}" + "".join(f"{c:>{width}}" for c in cells) + (f"   {ceiling}" if ceiling else ""))

    full = r.get("full_backup", {})
    row("full backup, MiB/s", lambda c: f"{full[c].mib_s:.0f}", backup_ceiling(ctx))
    row("  wall s / CPU s", lambda c: f"{full[c].wall:.2f} / {full[c].cpu:.2f}")
    unchanged = r.get("unchanged", {}).get("timing")
    if unchanged:
        row("backup of the unchanged image, s (rpfs tracked)", lambda c: f"{unchanged.wall:.2f}" if c == "rpfs" else "")
    for fraction in CHANGES:
        step = r.get(f"incremental_{fraction * 100:.0f}")
        if not step:
            continue
        rows = step["timings"]
        written = sum(step["written_bytes"]) / len(step["written_bytes"]) / MiB
        row(f"incremental after {fraction:.0%} ({written:.0f} MiB written), s",
            lambda c: (f"{rows['rpfs'].wall:.2f} / {rows['rpfs_checksum'].wall:.2f}" if c == "rpfs"
                       else f"{rows[c].wall:.2f}"))
        row("  CPU s", lambda c: (f"{rows['rpfs'].cpu:.2f} / {rows['rpfs_checksum'].cpu:.2f}" if c == "rpfs"
                                  else f"{rows[c].cpu:.2f}"))
    sizes = r.get("store_bytes", {})
    previous = None
    for name, by_tool in sizes.items():
        title = "store after the full backup, MiB" if name == "full" else f"  after {name.split('_')[1]}%: MiB (+added)"
        row(title, lambda c: f"{by_tool[c] / MiB:.0f}" + (f" (+{(by_tool[c] - previous[c]) / MiB:.0f})"
                                                            if previous else ""))
        previous = by_tool
    for job, title in (("restore", "full restore warm / cold, MiB/s"),
                       ("cat", "cat through the mount warm / cold, MiB/s")):
        warm, cold = r.get(f"{job}_warm", {}), r.get(f"{job}_cold", {})
        ceiling = (f"bindfs {warm['bindfs'].mib_s:.0f} / {cold['bindfs'].mib_s:.0f}" if "bindfs" in warm else "")
        row(title, lambda c: f"{warm[c].mib_s:.0f} / {cold[c].mib_s:.0f}", ceiling)
        row("  CPU s warm / cold (with the daemon's)", lambda c: f"{warm[c].cpu:.2f} / {cold[c].cpu:.2f}")
        if job == "cat":
            again = r.get("cat_again", {})
            row("  again in the same mount, MiB/s", lambda c: f"{again[c].mib_s:.0f}",
                f"bindfs {again['bindfs'].mib_s:.0f}" if "bindfs" in again else "")
    copy = r.get("copy", {})
    row("files via ro ext4 on a loop device on the mount, MiB/s", lambda c: f"{copy[c].mib_s:.0f}",
        f"bindfs {copy['bindfs'].mib_s:.0f}" if "bindfs" in copy else "")
    row("  CPU s (with the daemon's)", lambda c: f"{copy[c].cpu:.2f}")
    qd1, qd16 = r.get("fio_qd1", {}), r.get("fio_qd16", {})
    warm1, warm16 = r.get("fio_qd1_warm", {}), r.get("fio_qd16_warm", {})
    row("random 4 KiB reads on that loop device QD1 / QD16, IOPS",
        lambda c: f"{qd1[c].extra['iops']} / {qd16[c].extra['iops']}",
        f"bindfs {qd1['bindfs'].extra['iops']} / {qd16['bindfs'].extra['iops']}; page cache kept "
        f"{warm1['bindfs'].extra['iops']} / {warm16['bindfs'].extra['iops']}" if "bindfs" in warm1 else "")
    row("  p99 latency QD1 / QD16, ms", lambda c: f"{qd1[c].extra['p99_ms']:.2f} / {qd16[c].extra['p99_ms']:.1f}")
    row("peak memory of a full backup: anon / max RSS, MiB",
        lambda c: f"{full[c].extra['peak_anon_mib']:.0f} / {full[c].extra['max_rss_mib']:.0f}")
    cat = r.get("cat_cold", {})
    row("peak anon memory of the mount daemon (cat / loop), MiB",
        lambda c: f"{cat[c].extra['daemon_memory']['peak_anon_mib']:.0f} / "
                  f"{copy[c].extra['daemon_memory']['peak_anon_mib']:.0f}")
    print(f"(rpfs: the store that keeps a reflink snapshot, tracking changes; where two figures, 'tracked / by "
          f"checksum' for backups; restores and mounts read the by-checksum store. Peak anonymous memory: RssAnon "
          f"summed over the processes, sampled every {PeakMemory.INTERVAL * 1000:.0f} ms; max RSS: GNU time's, "
          f"counting mapped pages (rpfs's LMDB). The loop device: rpfs attach (direct I/O, 1 MiB read-ahead) "
          f"for rpfs, losetup -r for the others. Copied: {r.get('copy_bytes', 0) / MiB:.0f} MiB in "
          f"{r.get('copy_files', 0)} files; fio {ctx.fio_seconds} s per run.)")
    for fraction in CHANGES:
        step = r.get(f"incremental_{fraction * 100:.0f}", {}).get("timings")
        if not step:
            continue
        ours = step["rpfs"]
        print(f"rpfs incremental after {fraction:.0%}: tracked ({ours.extra.get('change_tracking')}) read "
              f"{ours.extra.get('read_bytes', 0) / MiB:.0f} MiB; by checksum "
              f"({step['rpfs_checksum'].extra.get('change_tracking')}) read "
              f"{step['rpfs_checksum'].extra.get('read_bytes', 0) / MiB:.0f} MiB")


def backup_ceiling(ctx: Context) -> str:
    rows = ctx.results.get("backup", {})
    if "openssl" not in rows or "zstd" not in rows:
        return ""
    return f"openssl sha256 {rows['openssl'].mib_s:.0f}, zstd -3 {rows['zstd'].mib_s:.0f}/core (ext4 source)"


def print_rpfs_only(ctx: Context) -> None:
    tracking, metadata, r = ctx.results.get("tracking"), ctx.results.get("metadata"), ctx.results.get("peers")
    if tracking:
        inc, full = tracking["timings"]["rpfs"], tracking["full"]
        written = sum(tracking["written_bytes"]) / len(tracking["written_bytes"])
        print(f"change tracking, {tracking['image_bytes'] / GiB:.1f} GiB image: full backup {full.wall:.2f} s "
              f"({full.mib_s:.0f} MiB/s, CPU {full.cpu:.2f} s); after {written / MiB:.0f} MiB written, tracked "
              f"incremental {inc.wall:.2f} s (CPU {inc.cpu:.2f} s, {inc.extra.get('change_tracking')}, read "
              f"{inc.extra.get('read_bytes', 0) / MiB:.0f} MiB) = {inc.wall / full.wall:.1%} of the full backup")
        warm = tracking["warm"]["timing"]
        print(f"        with the page cache kept: after {tracking['warm']['written_bytes'] / MiB:.0f} MiB written, "
              f"{warm.wall:.2f} s (CPU {warm.cpu:.2f} s, rpfs's own timer {warm.extra['summary']['seconds']:.2f} s, "
              f"read {warm.extra.get('read_bytes', 0) / MiB:.0f} MiB) = {warm.wall / full.wall:.1%}")
    if r and "unchanged" in r:
        u = r["unchanged"]
        print(f"backup of the unchanged bench image: {u['timing'].wall:.2f} s, adding {added(u)}; scaled: "
              f"{u['added_per_tib'] / KiB:.0f} KiB per TiB")
    if metadata:
        print(f"unchanged 1 TiB sparse disk ({metadata['data_bytes'] / MiB:.0f} MiB of data, 1 MiB per GiB): full "
              f"backup {metadata['full'].wall:.2f} s, backup of it unchanged {metadata['timing'].wall:.2f} s adding "
              f"{added(metadata)}")


def added(found: dict) -> str:
    return (f"{found['lmdb_pages_added_bytes'] / KiB:.1f} KiB of LMDB pages, {found['lmdb_records_added_bytes']} "
            f"bytes of records (du +{found['du_added_bytes'] / KiB:.0f} KiB)")
