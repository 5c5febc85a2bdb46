"""Consistent snapshots on real kernel parts: XFS reflinks, a live ext4 under a workload, fsfreeze,
pre/post scripts (a SQLite checkpoint), the freeze watchdog, disks in use, kept snapshots."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import REPO, rpfs
from conftest import skip_or_fail_in_ci
from diskimages import make_whole_disk_ext4, random_files

from rpfs.backup import snapshot

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("kernel")]
MiB = 1 << 20


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@contextmanager
def loop_mounted(image: Path, mountpoint: Path, *options: str):
    """Mount an image read-write on an autoclear loop device; always unmounted afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", ",".join(("loop",) + options), str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        subprocess.run(["fsfreeze", "-u", str(mountpoint)], capture_output=True)   # never leave it frozen
        run("umount", str(mountpoint))


@pytest.fixture
def vm_on_xfs(tmp_path):
    """An XFS (reflink=1) filesystem holding a VM image: an ext4 disk, loop-mounted read-write."""
    xfs_image = tmp_path / "xfs.img"
    with open(xfs_image, "wb") as f:
        f.truncate(512 * MiB)
    run("mkfs.xfs", "-q", "-m", "reflink=1", str(xfs_image))
    with loop_mounted(xfs_image, tmp_path / "xfs") as xfs:
        disk = make_whole_disk_ext4(xfs / "web01-os.img", random_files(80, count=10), size=96 * MiB)
        with loop_mounted(disk, tmp_path / "guest") as guest:
            store = tmp_path / "store"
            rpfs("init", store=store)
            yield store, disk, guest


class Workload:
    """Writes files into the guest filesystem until stopped, as a running VM would."""

    def __init__(self, root: Path):
        self.root, self.stop, self.count = root, threading.Event(), 0
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        while not self.stop.is_set():
            path = self.root / f"work-{self.count % 50}.bin"
            with open(path, "wb") as f:
                f.write(os.urandom(64 * 1024))
                if self.count % 10 == 0:
                    f.flush()
                    os.fsync(f.fileno())
            self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def write_root_file(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chown(path, 0, 0)
    path.chmod(mode)
    return path


def config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    return write_root_file(tmp_path / "consistency.toml", text, mode)


def script(tmp_path: Path, name: str, body: str, mode: int = 0o700) -> Path:
    return write_root_file(tmp_path / name, f"#!/bin/sh\n{body}\n", mode)


def restore_and_fsck(store: Path, tmp_path: Path, name: str = "restored.img") -> Path:
    target = tmp_path / name
    rpfs("restore", "web01", "--disk", "os", "--to", str(target), store=store)
    run("fsck.ext4", "-fn", str(target))
    return target


def test_frozen_snapshot_of_a_live_filesystem_is_clean(vm_on_xfs, tmp_path):
    store, disk, guest = vm_on_xfs
    cfg = config(tmp_path, f'[freeze]\nmountpoints = ["{guest}"]\nmax_seconds = 20\n')
    with Workload(guest) as work:
        time.sleep(0.3)
        out = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg), "--json",
                              store=store).stdout)
    assert work.count > 0
    point = out["recovery_point"]
    assert point["consistency"] == "file-system"
    assert point["quiesce"]["freeze"]["seconds"] < 5 and not point["quiesce"]["freeze"]["watchdog_stepped_in"]
    assert not (disk.parent / ".rpfs-snapshots").exists()   # the snapshot went once the data was stored
    restore_and_fsck(store, tmp_path)


def test_snapshot_without_freeze_is_crash_consistent(vm_on_xfs, tmp_path):
    store, disk, guest = vm_on_xfs
    with Workload(guest):
        out = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--json", store=store).stdout)
    assert out["recovery_point"]["consistency"] == "crash"
    assert "read_live" not in out["recovery_point"]["quiesce"]


SQLITE_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER, payload BLOB)")
for i in range(int(sys.argv[2])):
    db.execute("INSERT INTO t VALUES (?, randomblob(1000))", (i,))
print("written", flush=True)
sys.stdin.readline()       # keep the database open (WAL not checkpointed) until told to stop
"""


def test_application_consistent_sqlite(vm_on_xfs, tmp_path):
    store, disk, guest = vm_on_xfs
    database = guest / "app.db"
    writer = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(database), "500"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "written\n"
        checkpoint = (f"{sys.executable} -c \"import sqlite3; sqlite3.connect('{database}')"
                      f".execute('PRAGMA wal_checkpoint(TRUNCATE)')\"")
        pre = script(tmp_path, "pre.sh", f"{checkpoint} && touch {tmp_path}/paused")
        post = script(tmp_path, "post.sh", f"rm {tmp_path}/paused && touch {tmp_path}/resumed")
        cfg = config(tmp_path, f'[pre]\npath = "{pre}"\ntimeout_seconds = 30\n'
                               f'[post]\npath = "{post}"\n'
                               f'[freeze]\nmountpoints = ["{guest}"]\n')
        out = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg), "--json",
                              store=store).stdout)
    finally:
        writer.communicate("", timeout=30)
    point = out["recovery_point"]
    assert point["consistency"] == "application"
    assert point["quiesce"]["pre"]["ok"] and point["quiesce"]["post"]["ok"]
    assert (tmp_path / "resumed").exists() and not (tmp_path / "paused").exists()
    restored = restore_and_fsck(store, tmp_path)
    with loop_mounted(restored, tmp_path / "check", "ro", "noload") as check:
        copy = tmp_path / "copy.db"
        copy.write_bytes((check / "app.db").read_bytes())
    db = sqlite3.connect(copy)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM t").fetchone() == (500,)


def test_failing_pre_script(vm_on_xfs, tmp_path):
    store, disk, guest = vm_on_xfs
    pre = script(tmp_path, "pre.sh", "echo cannot quiesce the database >&2; exit 3")
    post = script(tmp_path, "post.sh", f"touch {tmp_path}/post-ran")
    stop = config(tmp_path, f'[pre]\npath = "{pre}"\n[post]\npath = "{post}"\n[freeze]\nmountpoints = ["{guest}"]\n')
    done = rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(stop), store=store, check=False)
    assert done.returncode != 0 and "exit code 3: cannot quiesce the database" in done.stderr
    assert done.stderr.count("\n") == 1
    assert (tmp_path / "post-ran").exists()    # the application was told to resume
    assert json.loads(rpfs("list", "--json", store=store).stdout) == []

    go_on = config(tmp_path, f'[pre]\npath = "{pre}"\ncontinue_on_failure = true\n[post]\npath = "{post}"\n'
                             f'[freeze]\nmountpoints = ["{guest}"]\n')
    out = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(go_on), "--json",
                          store=store).stdout)
    assert out["recovery_point"]["consistency"] == "file-system"
    assert out["recovery_point"]["quiesce"]["pre"]["ok"] is False


def test_hanging_script_times_out_and_nothing_stays_frozen(vm_on_xfs, tmp_path):
    """The hanging pre-script is killed, the backup goes on to freeze and snapshot (continue_on_failure),
    and the filesystem is writable afterwards."""
    store, disk, guest = vm_on_xfs
    pre = script(tmp_path, "pre.sh", "sleep 600")
    cfg = config(tmp_path, f'[pre]\npath = "{pre}"\ntimeout_seconds = 1\nretries = 1\ncontinue_on_failure = true\n'
                           f'[freeze]\nmountpoints = ["{guest}"]\n')
    started = time.monotonic()
    out = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg), "--json",
                          store=store).stdout)["recovery_point"]
    assert time.monotonic() - started < 30
    assert out["quiesce"]["pre"]["message"] == "timed out after 1 s" and out["quiesce"]["freeze"]["mountpoints"]
    assert out["consistency"] == "file-system"      # it reached the freeze
    assert writable_within(guest, 10)


@pytest.mark.parametrize("what", ["script", "config"])
def test_unsafe_permissions_are_refused(vm_on_xfs, tmp_path, what):
    store, disk, _ = vm_on_xfs
    pre = script(tmp_path, "pre.sh", "true", mode=0o777 if what == "script" else 0o700)
    cfg = config(tmp_path, f'[pre]\npath = "{pre}"\n', mode=0o666 if what == "config" else 0o600)
    done = rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg), store=store, check=False)
    assert done.returncode != 0 and "writable by group or others" in done.stderr


def test_bad_config_is_refused_with_the_reason(vm_on_xfs, tmp_path):
    store, disk, _ = vm_on_xfs
    cfg = config(tmp_path, '[pre]\npath = "/bin/true"\ntimeout = 5\n')
    done = rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg), store=store, check=False)
    assert done.returncode != 0 and "unknown key(s) in [pre]: timeout" in done.stderr


HOLD_FREEZE = """
import sys, time
from rpfs.backup.quiesce import frozen
with frozen([sys.argv[1]], float(sys.argv[2])) as window:
    print("frozen", flush=True)
    time.sleep(float(sys.argv[3]))
print("stepped in" if window.watchdog_stepped_in else "thawed in time", flush=True)
"""


def writable_within(path: Path, seconds: float) -> bool:
    """True if a write to the filesystem completes within seconds (it blocks while frozen)."""
    probe = subprocess.Popen(["sh", "-c", f"echo x > {path}/probe && sync -f {path}"])
    try:
        probe.wait(timeout=seconds)
        return probe.returncode == 0
    except subprocess.TimeoutExpired:
        subprocess.run(["fsfreeze", "-u", str(path)], capture_output=True)
        probe.wait()
        return False


def test_watchdog_thaws_when_the_backup_is_killed_during_the_freeze(vm_on_xfs):
    _, _, guest = vm_on_xfs
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FREEZE, str(guest), "120", "600"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline() == "frozen\n"
        assert not writable_within(guest, 0.5), "the filesystem was not frozen"
        holder.send_signal(signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait()
    assert writable_within(guest, 10)


def test_a_freeze_right_after_a_killed_backup_is_not_undone_by_its_watchdog(vm_on_xfs):
    """The watchdog of a killed backup goes on thawing for a while: the next backup's freeze waits for it
    to exit, or that freeze would be undone under a recovery point that claims it (found by tools/chaos)."""
    _, _, guest = vm_on_xfs
    first = subprocess.Popen([sys.executable, "-c", HOLD_FREEZE, str(guest), "120", "600"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    second = None
    try:
        assert first.stdout.readline() == "frozen\n"
        first.send_signal(signal.SIGKILL)
        second = subprocess.Popen([sys.executable, "-c", HOLD_FREEZE, str(guest), "120", "600"],
                                  stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert second.stdout.readline() == "frozen\n"
        assert not writable_within(guest, 3), "the first backup's watchdog thawed the second one's freeze"
    finally:
        for holder in (first, second):
            if holder is not None:
                holder.kill()
                holder.wait()
    assert writable_within(guest, 10)


def test_watchdog_bounds_the_freeze_window(vm_on_xfs):
    _, _, guest = vm_on_xfs
    done = subprocess.run([sys.executable, "-c", HOLD_FREEZE, str(guest), "0.5", "3"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.stdout.splitlines() == ["frozen", "stepped in"]
    assert writable_within(guest, 5)


def test_watchdog_counts_from_the_freeze_not_from_arming(vm_on_xfs):
    """A slow `fsfreeze -f` (it syncs first) must not use up the window (issue 9, defect 6)."""
    _, _, guest = vm_on_xfs
    watchdog = subprocess.Popen([sys.executable, "-m", "rpfs.backup.freeze_watchdog", "1", str(guest)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert watchdog.stdout.readline() == "armed\n"
        time.sleep(2)                                   # longer than the window: the freeze is slow
        run("fsfreeze", "-f", str(guest))
        watchdog.stdin.write("frozen\n")
        watchdog.stdin.flush()
        again = subprocess.run(["fsfreeze", "-f", str(guest)], capture_output=True)   # EBUSY while frozen
        assert again.returncode != 0, "thawed before its window ran out"
        assert writable_within(guest, 10), "the watchdog did not thaw after its window"
        watchdog.stdin.write("thawed\n")
        watchdog.stdin.flush()
        assert watchdog.stdout.readline() == "timed out\n"
    finally:
        watchdog.kill()
        watchdog.wait()
        subprocess.run(["fsfreeze", "-u", str(guest)], capture_output=True)


def test_a_disk_in_use_without_snapshot_needs_allow_live(tmp_path):
    disk = make_whole_disk_ext4(tmp_path / "live.img", random_files(81, count=3))
    store = tmp_path / "store"
    rpfs("init", store=store)
    try:
        snapshot.clone(disk, snapshot.snapshot_path(disk, "probe", "x", "probe"))
        skip_or_fail_in_ci("the test folder's filesystem has reflinks: the disk would be snapshotted")
    except snapshot.CannotSnapshot:
        pass
    with loop_mounted(disk, tmp_path / "guest"):
        done = rpfs("backup", "vm", f"--disk=os={disk}", store=store, check=False)
        assert done.returncode != 0 and "is attached to /dev/loop" in done.stderr and "--allow-live" in done.stderr
        out = json.loads(rpfs("backup", "vm", f"--disk=os={disk}", "--allow-live", "--json", store=store).stdout)
    assert out["recovery_point"]["consistency"] == "inconsistent"


def test_kept_snapshot_is_listed_and_replaced(vm_on_xfs, tmp_path):
    store, disk, _ = vm_on_xfs
    first = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--keep-snapshot-days", "3", "--json",
                            store=store).stdout)["recovery_point"]
    kept = json.loads(rpfs("snapshots", "--json", store=store).stdout)
    assert [k["recovery_point"] for k in kept] == [first["id"]]
    first_path = Path(kept[0]["disks"]["os"]["path"])
    assert first_path.exists() and first_path.read_bytes() == disk.read_bytes()
    second = json.loads(rpfs("backup", "web01", f"--disk=os={disk}", "--keep-snapshot-days", "3", "--json",
                             store=store).stdout)["recovery_point"]
    kept = json.loads(rpfs("snapshots", "--json", store=store).stdout)
    assert [k["recovery_point"] for k in kept] == [second["id"]]
    assert not first_path.exists()
    rpfs("backup", "web01", f"--disk=os={disk}", store=store)     # not kept: the older kept one stays
    assert len(json.loads(rpfs("snapshots", "--json", store=store).stdout)) == 1


def test_a_killed_backups_snapshot_is_removed_by_the_next_backup(vm_on_xfs, tmp_path):
    """kill -9 after the snapshot (here by the post-script, which runs right after it) leaves the clone;
    the next backup of the VM removes it (issue 9, defect 3)."""
    store, disk, _ = vm_on_xfs
    cfg = config(tmp_path, f'[post]\npath = "{script(tmp_path, "post.sh", "kill -9 $PPID")}"\n')
    done = rpfs("backup", "web01", f"--disk=os={disk}", "--consistency-config", str(cfg), store=store, check=False)
    assert done.returncode == -signal.SIGKILL
    assert len(list((disk.parent / ".rpfs-snapshots").rglob("*.img"))) == 1
    rpfs("backup", "web01", f"--disk=os={disk}", "--keep-snapshot-days", "1", store=store)
    [kept] = json.loads(rpfs("snapshots", "--json", store=store).stdout)
    assert list((disk.parent / ".rpfs-snapshots").rglob("*.img")) == [Path(kept["disks"]["os"]["path"])]
    rpfs("backup", "web01", f"--disk=os={disk}", store=store)     # a recorded kept snapshot is no orphan
    assert Path(kept["disks"]["os"]["path"]).exists()


def test_disk_added_between_backups(tmp_path):
    os_disk = make_whole_disk_ext4(tmp_path / "os.img", random_files(82, count=6))
    data_disk = make_whole_disk_ext4(tmp_path / "data.img", random_files(83, count=6))
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=os={os_disk}", store=store)
    out = json.loads(rpfs("backup", "vm", f"--disk=os={os_disk}", f"--disk=data={data_disk}", "--json",
                          store=store).stdout)
    disks = {d["name"]: d for d in out["recovery_point"]["disks"]}
    assert disks["os"]["new_blocks"] == 0                       # incremental
    assert disks["data"]["new_blocks"] > 0                      # a full first copy
    points = json.loads(rpfs("list", "--json", store=store).stdout)
    assert [[d["name"] for d in p["disks"]] for p in points] == [["os"], ["os", "data"]]


def test_restore_from_a_kept_snapshot_is_a_clone(vm_on_xfs, tmp_path):
    store, disk, _ = vm_on_xfs
    rpfs("backup", "web01", f"--disk=os={disk}", "--keep-snapshot-days", "1", store=store)
    target = disk.parent / "restored-from-snapshot.img"     # same XFS: a reflink clone
    rpfs("restore", "web01", "--disk", "os", "--to", str(target), store=store)
    assert "shared" in run("filefrag", "-v", str(target))   # its extents are the snapshot's
    (tmp_path / "empty" / "folders").mkdir(parents=True)
    from_store = tmp_path / "empty" / "folders" / "from-store.img"   # another filesystem: cannot clone,
    rpfs("restore", "web01", "--disk", "os", "--to", str(from_store), store=store)   # decoded from the store
    assert target.read_bytes() == from_store.read_bytes()
    assert "shared" not in run("filefrag", "-v", str(from_store))
    target.unlink()
