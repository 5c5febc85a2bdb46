"""tools/bench --vm: the full and the incremental backup of a running libvirt domain (issue 24's speed targets).

The test guest (tools/guest) boots with a 4 GiB qcow2 data disk (vda, ext4 on /data) that holds about 2.5 GiB of
random data. The data is written on the host before the guest starts (a sparse raw file, mkfs.ext4, loop mount,
files of os.urandom, then `qemu-img convert` to qcow2): under TCG the guest writes a few MiB/s, which would make
the fill take many minutes and measure the emulator, not rpfs.
Rows:
  baseline        rpfs backup --disk of the same 4 GiB as the raw file it was converted from, into a fresh store:
                  the same bytes through rpfs's image path, so full VM / baseline is what the VM path (libvirt's
                  backup job, NBD from qemu, the guest's freeze) costs over reading a file. (`qemu-img convert -U
                  -O raw` to /dev/null would time qemu's read alone, which says nothing about rpfs.)
  full            rpfs backup VM --libvirt DOMAIN --json into another fresh store
  change          1% of the disk (41 MiB) of random data written into a new file in the guest + sync (untimed row)
  incremental     the same command again: the dirty bitmap names what changed
Targets: incremental read_bytes <= 2% of the disk, incremental wall <= 5% of the full's, frozen <= 2 s each time.
The "rpfs s" column is rpfs's own timer (the --json summary's seconds: reading, storing and committing the point),
which leaves out the interpreter's start, the freeze, libvirt's job set-up and the checkpoint clean-up: wall minus
it is the fixed cost that the 5% target weighs against the full backup. CPU is user+sys of the rpfs process; the
"qemu" column is the domain's qemu process over the same time (it serves the NBD export, and runs the TCG guest).
The domain is named rpfs-test-bench-<pid> and lives in /var/lib/libvirt/images/<name>/; it is destroyed and
undefined and its folder removed whatever happens.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from bench_lib import GiB, MiB, RPFS, REPO, BenchError, Conditions, Timing, mounts_under, rpfs, run, run_timed

sys.path.insert(0, str(REPO / "tools" / "services"))
from guest_domain import domain_xml, remove_domain  # noqa: E402

URI = "qemu:///system"
IMAGES = Path("/var/lib/libvirt/images")
DISK_BYTES = 4 * GiB
FILL_BYTES = int(2.5 * GiB)
FILE_BYTES = 64 * MiB
CHANGE_MIB = 41                         # 1% of 4 GiB
TARGETS = {"read_share": 0.02, "time_share": 0.05, "frozen_seconds": 2.0}
VM = "benchvm"


def guest_files() -> Path:
    done = subprocess.run([str(REPO / "tools" / "guest"), "build"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise BenchError(f"tools/guest build failed: {done.stderr.strip()[-300:]}")
    return Path(done.stdout.strip())


def make_filled_raw(raw: Path, mnt: Path) -> int:
    """A sparse DISK_BYTES raw file with ext4 holding FILL_BYTES of random files; the bytes written."""
    with open(raw, "wb") as f:
        f.truncate(DISK_BYTES)
    run(["mkfs.ext4", "-q", "-F", "-L", "rpfs-data", str(raw)])
    mnt.mkdir()
    run(["mount", "-o", "loop", str(raw), str(mnt)])
    written = 0
    try:
        os.mkdir(mnt / "fill")
        index = 0
        while written < FILL_BYTES:
            with open(mnt / "fill" / f"f{index:03d}", "wb") as f:
                for _ in range(FILE_BYTES // MiB):
                    f.write(os.urandom(MiB))
            written += FILE_BYTES
            index += 1
    finally:
        run(["umount", str(mnt)])
    return written


class Domain:
    """The bench's guest on libvirtd, and its agent."""

    def __init__(self, conn, name: str, folder: Path, disk: Path):
        self.conn, self.name, self.folder = conn, name, folder
        self.dom = conn.defineXML(domain_xml(name, folder, disk, "qcow2"))

    def agent(self, command: str, arguments: dict | None = None, timeout: int = 10):
        import libvirt_qemu
        request = {"execute": command, **({"arguments": arguments} if arguments is not None else {})}
        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), timeout, 0))["return"]

    def wait_for_agent(self, timeout: float = 300) -> float:
        import libvirt
        start = time.monotonic()
        delay = 0.2
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return time.monotonic() - start
            except libvirt.libvirtError as error:
                if time.monotonic() - start > timeout:
                    raise BenchError(f"{self.name}: the agent did not answer within {timeout:.0f} s: {error}")
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def exec(self, cmd: str, timeout: float = 600) -> str:
        """/bin/sh -c cmd in the guest; its stdout (BenchError when it fails or outlasts timeout)."""
        pid = self.agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                if status.get("exitcode") != 0:
                    raise BenchError(f"in the guest, {cmd!r} failed ({status}): {err.strip()[-300:]}")
                return out
            if time.monotonic() > deadline:
                raise BenchError(f"in the guest, {cmd!r} did not finish within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def qemu_pid(self) -> int | None:
        pidfile = Path(f"/run/libvirt/qemu/{self.name}.pid")
        with contextlib.suppress(OSError, ValueError):
            return int(pidfile.read_text().strip())
        return None


@contextlib.contextmanager
def bench_domain(folder: Path, name: str, disk: Path) -> Iterator[Domain]:
    """The domain defined and started; destroyed, undefined on leaving, whatever happened."""
    import libvirt
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as error:
        raise BenchError(f"libvirtd does not answer at {URI} (tools/libvirt start): {error}")
    try:
        remove_domain(conn, name)
        domain = Domain(conn, name, folder, disk)
        domain.dom.create()
        yield domain
    finally:
        remove_domain(conn, name)
        conn.close()


def backup_vm(label: str, store: Path, domain: Domain, conditions: Conditions) -> tuple[Timing, dict]:
    conditions.prepare()
    print(f"bench:   {label}", flush=True)
    timing, out = run_timed(label, [str(RPFS), "--store", str(store), "backup", VM, "--libvirt", domain.name,
                                    "--json"], DISK_BYTES, daemon_pid=domain.qemu_pid(), capture=True)
    answer = json.loads(out)
    point = answer.get("recovery_point", answer)
    disk = point["disks"][0]
    guest = (point.get("quiesce") or {}).get("guest") or {}
    timing.extra.update(read_bytes=disk.get("read_bytes"), change_tracking=disk.get("change_tracking"),
                        change_tracking_reason=disk.get("change_tracking_reason"),
                        consistency=point.get("consistency"), frozen_seconds=guest.get("frozen_seconds"),
                        rpfs_seconds=(answer.get("summary") or {}).get("seconds", answer.get("seconds")))
    return timing, answer


def run_vm(cache_dir: Path, conditions: Conditions) -> dict:
    """The VM rows; results as a dict of Timings and figures (BenchError if a step cannot go on)."""
    print("bench: vm (running libvirt domain, TCG)", flush=True)
    name = f"rpfs-test-bench-{os.getpid()}"
    folder = IMAGES / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vm-run-", dir=cache_dir))
    shutil.rmtree(folder, ignore_errors=True)
    results: dict = {"disk_bytes": DISK_BYTES, "domain": name, "cpus": os.cpu_count()}
    saved = {key: os.environ.get(key) for key in ("RPFS_RUN_DIR", "RPFS_KEY_FILE")}
    os.environ["RPFS_RUN_DIR"] = str(work / "run")   # ours, removed with work
    os.environ["RPFS_KEY_FILE"] = str(work / "key")  # the encrypted stores' key (made by rpfs init)
    try:
        files = guest_files()
        IMAGES.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o711)     # libvirt's qemu (libvirt-qemu) must reach the files
        for part in ("vmlinuz", "initrd.img"):
            shutil.copyfile(files / part, folder / part)
        raw, disk = work / "data.raw", folder / "data.qcow2"
        print(f"bench:   filling {raw} ({FILL_BYTES / GiB:.1f} GiB of random files in ext4 on {DISK_BYTES / GiB:.0f} "
              "GiB)", flush=True)
        started = time.monotonic()
        results["fill_bytes"] = make_filled_raw(raw, work / "mnt")
        results["fill_seconds"] = round(time.monotonic() - started, 1)
        base_store = work / "store-baseline"
        rpfs(base_store, "init")
        conditions.prepare()
        print("bench:   rpfs backup --disk of the raw file (baseline)", flush=True)
        base, out = run_timed("rpfs backup --disk (raw file)", [str(RPFS), "--store", str(base_store), "backup",
                                                                "benchraw", "--disk", f"vda={raw}", "--json"],
                              DISK_BYTES, capture=True)
        base.extra["summary"] = {k: v for k, v in json.loads(out).items() if k != "recovery_point"}
        results["baseline"] = base
        shutil.rmtree(base_store)
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
        raw.unlink()
        results["qcow2_allocated_bytes"] = disk.stat().st_blocks * 512
        store = work / "store-vm"
        rpfs(store, "init")
        with bench_domain(folder, name, disk) as domain:
            results["agent_seconds"] = round(domain.wait_for_agent(), 1)
            full, _ = backup_vm("rpfs backup VM --libvirt (full)", store, domain, conditions)
            results["full"] = full
            print(f"bench:   change {CHANGE_MIB} MiB in the guest", flush=True)
            started = time.monotonic()
            domain.exec(f"dd if=/dev/urandom of=/data/change bs=1M count={CHANGE_MIB} 2>/dev/null && sync")
            results["change_seconds"] = round(time.monotonic() - started, 1)
            incr, _ = backup_vm("rpfs backup VM --libvirt (incremental)", store, domain, conditions)
            results["incremental"] = incr
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for key in (k for k, v in saved.items() if v is None):
            os.environ.pop(key, None)
        for point in mounts_under(work):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return results


def print_report(r: dict) -> None:
    """The VM rows, the ratios against the targets, PASS or MISS each."""
    if "full" not in r:
        return
    print()
    print(f"vm: a running domain (TCG, 1 vCPU, 512 MiB) with a {r['disk_bytes'] / GiB:.0f} GiB qcow2 disk "
          f"(ext4, {r['fill_bytes'] / GiB:.1f} GiB of random files, {r['qcow2_allocated_bytes'] / MiB:.0f} MiB "
          f"allocated); {r['cpus']} CPU cores shared with other work")
    header = (f"{'vm step':<40} {'wall s':>7} {'rpfs s':>6} {'MiB/s':>7} {'CPU s':>6} {'qemu':>6} {'read MiB':>9} "
              f"{'frozen s':>8}")
    print(header)
    print("-" * len(header))
    for key in ("baseline", "full", "incremental"):
        t = r[key]
        read = t.extra.get("read_bytes")
        frozen = t.extra.get("frozen_seconds")
        own = t.extra.get("rpfs_seconds") or (t.extra.get("summary") or {}).get("seconds")
        print(f"{t.label:<40} {t.wall:>7.2f} {'' if own is None else f'{own:.2f}':>6} {t.mib_s:>7.0f} "
              f"{t.cpu_user + t.cpu_sys:>6.2f} "
              f"{t.daemon_cpu if t.daemon_cpu else 0:>6.2f} {'' if read is None else f'{read / MiB:.1f}':>9} "
              f"{'' if frozen is None else f'{frozen:.2f}':>8}")
    print(f"(MiB/s of the {r['disk_bytes'] / GiB:.0f} GiB disk; rpfs s: rpfs's own timer (--json seconds: reading, "
          f"storing, committing; not the start-up, the freeze, the job's set-up, the checkpoint clean-up);")
    print(f" CPU s: the rpfs process; qemu: the domain's qemu over the same time; change: {CHANGE_MIB} MiB written "
          f"+ sync in the guest in {r['change_seconds']} s)")
    full, incr, base = r["full"], r["incremental"], r["baseline"]
    print(f"full VM backup / baseline: {full.wall / base.wall:.2f}x the time "
          f"(change tracking: full {full.extra['change_tracking']}, incremental {incr.extra['change_tracking']})")
    read_share = (incr.extra["read_bytes"] or 0) / r["disk_bytes"]
    time_share = incr.wall / full.wall
    checks = [("incremental reads <= 2% of the disk", read_share, TARGETS["read_share"], f"{read_share * 100:.2f}%"),
              ("incremental time <= 5% of the full's", time_share, TARGETS["time_share"], f"{time_share * 100:.1f}%")]
    for key in ("full", "incremental"):
        frozen = r[key].extra.get("frozen_seconds")
        checks.append((f"guest frozen <= 2 s ({key})", frozen if frozen is not None else float("inf"),
                       TARGETS["frozen_seconds"], "not recorded" if frozen is None else f"{frozen:.2f} s"))
    r["targets"] = {}
    own_full, own_incr = full.extra.get("rpfs_seconds"), incr.extra.get("rpfs_seconds")
    if own_full and own_incr:
        print(f"  (by rpfs's own timers the incremental takes {own_incr / own_full * 100:.1f}% of the full's)")
    for text, value, limit, shown in checks:
        met = value <= limit
        r["targets"][text] = {"value": value, "limit": limit, "met": met}
        print(f"  {text:<40} {shown:>12}  {'PASS' if met else 'MISS'}")
