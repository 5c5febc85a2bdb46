"""Policies, protection, run, retention, gc, verify, jobs and usage."""
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cli_helpers import mounted, open_store, rpfs, writer_lock_held
from diskimages import random_disk
from test_backup import corrupt_one_block, read_all, write_image

from rpfs.backup.pipeline import backup
from rpfs.errors import RpfsError
from rpfs.policy.policies import Retention
from rpfs.policy.prune import delete_points, prune
from rpfs.policy.run import run
from rpfs.store.leases import Lease, leased_points, set_pinned
from rpfs.upkeep.gc import gc
from rpfs.upkeep.jobs import Job
from rpfs.upkeep.verify import verify

MiB = 1 << 20


def test_usage_follows_the_azure_example(store_path, tmp_path):
    """OS disk 17 units of data, temporary disk 5, data disk 30, an empty data disk: 47 protected."""
    rpfs("policy", "create", "daily", "--daily", "02:00", "--keep-last", "3", store=store_path)
    rpfs("protect", "vm", "--policy", "daily",
         f"--disk=os={random_disk(tmp_path / 'os.img', 17, 64)}",
         f"--temporary-disk=temp={random_disk(tmp_path / 'temp.img', 5)}",
         f"--disk=data={random_disk(tmp_path / 'data.img', 30)}",
         f"--disk=empty={random_disk(tmp_path / 'empty.img', 0, 32)}", store=store_path)
    out = json.loads(rpfs("run", "--stagger-seconds", "0", "--json", store=store_path).stdout)
    assert out["backed_up"] == ["vm"]
    usage = json.loads(rpfs("usage", "--json", store=store_path).stdout)
    [vm] = usage["vms"]
    assert vm["protected_instance_bytes"] == 47 * MiB
    assert abs(vm["backup_storage_bytes"] - 47 * MiB) < MiB     # random data does not compress
    assert usage["stored_bytes"] == pytest.approx(47 * MiB, rel=0.01)
    assert "split evenly" in usage["attribution"]


def test_shared_blocks_are_split_between_vms(store_path, tmp_path):
    disk = random_disk(tmp_path / "d.img", 8)
    rpfs("backup", "a", f"--disk=d={disk}", store=store_path)
    rpfs("backup", "b", f"--disk=d={disk}", store=store_path)
    usage = json.loads(rpfs("usage", "--json", store=store_path).stdout)
    storage = {v["vm"]: v["backup_storage_bytes"] for v in usage["vms"]}
    assert storage["a"] == storage["b"] == pytest.approx(usage["stored_bytes"] / 2, abs=2)
    assert usage["deduplication_ratio"] == pytest.approx(2.0)


def test_protect_and_policy_errors(store_path, tmp_path):
    disk = random_disk(tmp_path / "d.img", 1)
    for args, message in [
        (["protect", "vm", "--policy", "nope", f"--disk=d={disk}"], "unknown policy 'nope'"),
        (["policy", "create", "p", "--daily", "24:00"], "24:00"),
        (["policy", "create", "p", "--every-hours", "0"], "every_hours"),
        (["policy", "create", "p", "--keep-last", "-1"], "0 or more, not -1"),
    ]:
        done = rpfs(*args, store=store_path, check=False)
        assert done.returncode != 0 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    rpfs("policy", "create", "p", "--weekdays", "mon,thu", "--at", "03:30", "--keep-daily", "7", store=store_path)
    rpfs("protect", "vm", "--policy", "p", f"--disk=d={disk}", store=store_path)
    done = rpfs("protect", "vm", "--policy", "p", f"--disk=d={disk}", store=store_path, check=False)
    assert done.returncode != 0 and "protected already" in done.stderr
    done = rpfs("policy", "delete", "p", store=store_path, check=False)
    assert done.returncode != 0 and "protects vm" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[schedule]\ndaily = "02:00"\n[retention]\nkeep_last = 1\nforever = true\n')
    done = rpfs("policy", "import", str(bad), store=store_path, check=False)
    assert done.returncode != 0 and f"{bad}:6:" in done.stderr and "forever" in done.stderr
    assert [p["name"] for p in json.loads(rpfs("policy", "list", "--json", store=store_path).stdout)] == ["p"]


def test_run_backs_up_what_is_due(tmp_path):
    disk = random_disk(tmp_path / "d.img", 2)
    rpfs("init", store=tmp_path / "s")
    rpfs("policy", "create", "six", "--every-hours", "6", "--keep-last", "5", store=tmp_path / "s")
    rpfs("protect", "vm", "--policy", "six", f"--disk=d={disk}", store=tmp_path / "s")
    with open_store(tmp_path / "s") as store:
        now = datetime.now(timezone.utc)
        assert run(store, now=now).backed_up == ["vm"]
        assert run(store, now=now + timedelta(hours=1)).not_due == ["vm"]
        assert run(store, now=now + timedelta(hours=7)).backed_up == ["vm"]


def protected_vm(store: Path, disk: Path, backups: int, keep_last: int) -> list[str]:
    """A VM backed up `backups` times (new random data each time), protected by a keep-last policy."""
    ids = []
    for _ in range(backups):
        random_disk(disk, 2)
        ids.append(json.loads(rpfs("backup", "vm", f"--disk=d={disk}", "--json", store=store).stdout)["point_id"])
    rpfs("policy", "create", "p", "--daily", "02:00", "--keep-last", str(keep_last), store=store)
    rpfs("protect", "vm", "--policy", "p", f"--disk=d={disk}", store=store)
    return ids


def test_prune_keeps_what_the_policy_says_and_pinned_points(store_path, tmp_path):
    ids = protected_vm(store_path, tmp_path / "d.img", backups=4, keep_last=2)
    rpfs("pin", "vm", ids[0], store=store_path)
    dry = json.loads(rpfs("prune", "--dry-run", "--json", store=store_path).stdout)
    assert dry[0]["pruned"] == [ids[1]] and dry[0]["kept"][ids[0]] == "pinned"
    assert len(json.loads(rpfs("list", "--json", store=store_path).stdout)) == 4    # a dry run changes nothing
    before = json.loads(rpfs("usage", "--json", store=store_path).stdout)["unreferenced_blocks"]
    rpfs("prune", store=store_path)
    assert [p["id"] for p in json.loads(rpfs("list", "--json", store=store_path).stdout)] == [ids[0], ids[2], ids[3]]
    assert json.loads(rpfs("usage", "--json", store=store_path).stdout)["unreferenced_blocks"] == before + 2
    freed = json.loads(rpfs("gc", "--json", store=store_path).stdout)
    assert freed["removed_blocks"] == 2
    assert json.loads(rpfs("verify", "--json", store=store_path).stdout)["damaged"] == {}


def test_prune_refused_while_a_backup_of_the_same_vm_runs(store_path, tmp_path):
    rpfs("policy", "create", "p", "--daily", "02:00", "--keep-last", "1", store=store_path)
    rpfs("protect", "vm", "--policy", "p", f"--disk=d={random_disk(tmp_path / 'd.img', 1)}", store=store_path)
    with writer_lock_held(store_path, "backup of vm"):
        done = rpfs("prune", "vm", store=store_path, check=False)
        assert done.returncode != 0 and "a backup of vm is running" in done.stderr and done.stderr.count("\n") == 1


def test_verify_reports_damage(store_path, tmp_path):
    disk = random_disk(tmp_path / "d.img", 3)
    rpfs("backup", "vm", f"--disk=d={disk}", store=store_path)
    with open_store(store_path) as s:
        corrupt_one_block(s, s.point("vm"), "d")
    done = rpfs("verify", "--json", store=store_path, check=False)
    assert done.returncode != 0
    damaged = json.loads(done.stdout)["damaged"]
    assert list(damaged) == [f"vm/{json.loads(rpfs('list', '--json', store=store_path).stdout)[0]['id']}"]
    sample = json.loads(rpfs("verify", "--sample", "34", "--json", store=store_path, check=False).stdout)
    assert sample["checked_blocks"] == 1


def test_jobs_are_recorded_and_a_dead_one_shows_failed(store_path, tmp_path):
    disk = random_disk(tmp_path / "d.img", 1)
    rpfs("backup", "vm", f"--disk=d={disk}", store=store_path)
    rpfs("backup", "vm", "--disk=d=/nonexistent", store=store_path, check=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open_store(store_path) as s:
        s.put_record("jobs", "00-ghost", Job(id="00-ghost", kind="backup", vm="ghost", start="2026-01-01T00:00:00",
                                             pid=int(dead.stdout), pid_start="1").__dict__)
    listed = json.loads(rpfs("jobs", "--json", store=store_path).stdout)["jobs"]
    by_vm = {(j["vm"], j["status"]) for j in listed}
    assert ("vm", "succeeded") in by_vm and ("ghost", "failed") in by_vm
    assert json.loads(rpfs("jobs", "--running", "--json", store=store_path).stdout)["jobs"] == []


def test_the_job_table_stays_bounded(store_path, monkeypatch):
    """`rpfs run` records a prune every 15 minutes: finished jobs are forgotten by count and by age."""
    import rpfs.upkeep.jobs as jobs
    monkeypatch.setattr(jobs, "KEEP_JOBS", 5)
    with open_store(store_path) as s:
        s.put_record("jobs", "20000101T000000.000000Z-1", Job(id="20000101T000000.000000Z-1", kind="gc", vm=None,
                                                              start="2000-01-01T00:00:00", status="succeeded").__dict__)
        for _ in range(8):
            with jobs.recorded(s, "gc"):
                pass
        listed = jobs.list_jobs(s)
        assert len(listed) == jobs.KEEP_JOBS + 1          # the newest finished ones, and the last one
        assert not any(j.id.startswith("2000") for j in listed)   # older than KEEP_DAYS


def test_unprotect_keep_or_delete(store_path, tmp_path):
    rpfs("policy", "create", "p", "--daily", "02:00", "--keep-last", "1", store=store_path)
    disk = random_disk(tmp_path / "d.img", 1)
    for vm in ("keep", "drop"):
        rpfs("protect", vm, "--policy", "p", f"--disk=d={disk}", store=store_path)
        rpfs("backup", vm, f"--disk=d={disk}", store=store_path)
    done = rpfs("unprotect", "keep", store=store_path, check=False)
    assert done.returncode != 0 and "--keep-data or --delete-data" in done.stderr
    rpfs("unprotect", "keep", "--keep-data", store=store_path)
    rpfs("unprotect", "drop", "--delete-data", store=store_path)
    assert [p["vm"] for p in json.loads(rpfs("list", "--json", store=store_path).stdout)] == ["keep"]


def test_schedule_units(store_path, tmp_path):
    printed = rpfs("schedule", "--print", store=store_path).stdout
    assert "[Timer]" in printed and "OnCalendar=*:0/15" in printed and f"{store_path}" in printed and " run" in printed
    rpfs("schedule", "--install", "--unit-dir", str(tmp_path), store=store_path)
    assert (tmp_path / "rpfs.service").exists() and (tmp_path / "rpfs.timer").exists()


@pytest.mark.timeout(300)
def test_backups_prune_gc_and_mount_reads_concurrently(tmp_path, kernel):
    """Backups, prune, gc and reads through a mount at once; then every remaining point reads back exactly."""
    store_dir = tmp_path / "store"
    disk = tmp_path / "d.img"
    contents: dict[str, bytes] = {}
    stop = threading.Event()
    errors: list[str] = []
    rpfs("init", store=store_dir)
    with open_store(store_dir) as store:
        def backups():
            for i in range(8):
                img = write_image(disk, 100 + i, 6 * MiB)
                data = img.read_bytes()
                point, _ = backup(store, "vm", [("d", str(img))])
                contents[point.id] = data

        def maintenance():
            while not stop.wait(0.05):   # leave the backups room to take the writer lock
                try:
                    prune(store, {"vm": Retention(keep_last=3)})
                    gc(store)
                except Exception as e:   # busy while a backup holds the lock: try again
                    if "busy" not in str(e) and "backup is running" not in str(e):
                        errors.append(f"maintenance: {e}")

        with mounted(store_dir, tmp_path / "mnt") as mnt:
            def reads():
                while not stop.is_set():
                    for point_id, data in list(contents.items()):
                        try:
                            got = (mnt / "vm" / point_id / "d.img").read_bytes()
                        except FileNotFoundError:
                            continue          # pruned meanwhile
                        except OSError as e:
                            errors.append(f"read {point_id}: {e}")
                            continue
                        if got != data:
                            errors.append(f"{point_id} read back wrong")
            threads = [threading.Thread(target=maintenance), threading.Thread(target=reads)]
            for t in threads:
                t.start()
            try:
                backups()
            finally:
                stop.set()
                for t in threads:
                    t.join()
        assert errors == []
        prune(store, {"vm": Retention(keep_last=3)})
        gc(store)
        remaining = store.points("vm")
        assert len(remaining) == 3
        for point in remaining:
            assert read_all(store, point, "d") == contents[point.id]
        assert verify(store).damaged == {}


@pytest.mark.timeout(120)
def test_a_pruned_id_is_not_given_again_under_a_mount(tmp_path, kernel, monkeypatch):
    """Five backups in one second, prune, a sixth: had it reused the pruned id, the mount (and the
    kernel's page cache) would serve the pruned point's bytes under it."""
    import rpfs.backup.pipeline as pipeline
    moment = datetime(2026, 11, 25, 17, 0, 3, tzinfo=timezone.utc)
    frozen = type("Frozen", (datetime,), {"now": staticmethod(lambda tz=None: moment)})
    monkeypatch.setattr(pipeline, "datetime", frozen)
    store_dir, disk = tmp_path / "store", tmp_path / "d.img"
    rpfs("init", store=store_dir)
    with open_store(store_dir) as store, mounted(store_dir, tmp_path / "mnt") as mnt:
        contents = {}
        for i in range(4):
            point, _ = backup(store, "vm", [("d", str(write_image(disk, 300 + i, 2 * MiB)))])
            contents[point.id] = disk.read_bytes()
        first = min(contents)
        assert (mnt / "vm" / first / "d.img").read_bytes() == contents[first]   # now in the kernel's cache
        _wait_for(lambda: ("vm", first) not in leased_points(store_dir))   # the kernel sends RELEASE after close
        assert prune(store, {"vm": Retention(keep_last=3)})[0].pruned == [first]
        point, _ = backup(store, "vm", [("d", str(write_image(disk, 399, 2 * MiB)))])
        assert point.id not in contents
        assert (mnt / "vm" / point.id / "d.img").read_bytes() == disk.read_bytes()
        with pytest.raises(FileNotFoundError):
            (mnt / "vm" / first / "d.img").read_bytes()


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_prune_skips_a_recovery_point_open_through_a_mount(store_path, tmp_path, kernel):
    ids = protected_vm(store_path, tmp_path / "d.img", backups=2, keep_last=1)
    with mounted(store_path, tmp_path / "mnt") as mnt:
        with open(mnt / "vm" / ids[0] / "d.img", "rb") as held:
            result = json.loads(rpfs("prune", "--json", store=store_path).stdout)[0]
            assert result["pruned"] == [] and result["kept"][ids[0]].startswith("in use by a reader")
            held.read(4096)
        result = json.loads(rpfs("prune", "--json", store=store_path).stdout)[0]
        assert result["pruned"] == [ids[0]]


def test_a_lease_and_a_deletion_never_interleave(store_path, tmp_path):
    """Lease.take and delete_points, the two halves of the gate: a leased point stays, a deleted one
    cannot be leased, and a failed take leaves nothing leased."""
    ids = protected_vm(store_path, tmp_path / "d.img", backups=2, keep_last=1)
    with open_store(store_path) as s:
        first, second = s.point("vm", ids[0]), s.point("vm", ids[1])
        lease = Lease(s.path)
        try:
            lease.take(s, "vm", first.id)
            assert delete_points(s, [first]) == ([], {first.id: f"in use by a reader (pid {os.getpid()})"}, 0)
            assert delete_points(s, [second])[0] == [second.id]
            with pytest.raises(RpfsError, match="no longer exists"):
                lease.take(s, "vm", second.id)
            assert leased_points(s.path) == {("vm", first.id): f"a reader (pid {os.getpid()})"}
        finally:
            lease.close()
        assert [p.id for p in s.points("vm")] == [first.id]


def test_verify_leases_what_it_checks(store_path, tmp_path, monkeypatch):
    """A prune and gc landing while verify reads cannot make the points it checks look damaged."""
    import rpfs.upkeep.verify as verify_mod
    protected_vm(store_path, tmp_path / "d.img", backups=3, keep_last=1)
    real = verify_mod._verify
    pruned = {}

    with open_store(store_path) as s:
        def prune_and_gc_first(reader, points, *args):
            pruned.update(prune(s, {"vm": Retention(keep_last=1)})[0].kept)
            gc(s)
            return real(reader, points, *args)
        monkeypatch.setattr(verify_mod, "_verify", prune_and_gc_first)
        result = verify(s)
        assert result.damaged == {} and result.checked_blocks == 3 * 2
        assert sum(why.startswith("in use by a reader") for why in pruned.values()) == 2


def test_a_point_pinned_after_prune_decided_is_not_deleted(store_path, tmp_path):
    """pin can no longer lose to a running prune: it re-reads `pinned` under the gate (issue 9, defect 4)."""
    ids = protected_vm(store_path, tmp_path / "d.img", backups=2, keep_last=1)
    with open_store(store_path) as s:
        doomed = s.point("vm", ids[0])            # what prune decided to delete
        set_pinned(s, "vm", ids[0], True)          # pinned meanwhile
        assert delete_points(s, [doomed]) == ([], {ids[0]: "pinned"}, 0)
        assert s.point("vm", ids[0]).pinned


@pytest.mark.timeout(120)
def test_unprotect_delete_data_is_refused_while_a_point_is_open(store_path, tmp_path, kernel):
    ids = protected_vm(store_path, tmp_path / "d.img", backups=2, keep_last=1)
    with mounted(store_path, tmp_path / "mnt") as mnt:
        with open(mnt / "vm" / ids[1] / "d.img", "rb"):
            done = rpfs("unprotect", "vm", "--delete-data", store=store_path, check=False)
            assert done.returncode != 0 and "is open" in done.stderr and done.stderr.count("\n") == 1
            assert [p["id"] for p in json.loads(rpfs("list", "vm", "--json", store=store_path).stdout)] == ids
    rpfs("unprotect", "vm", "--delete-data", store=store_path)
    assert json.loads(rpfs("list", "--json", store=store_path).stdout) == []


@pytest.mark.timeout(120)
def test_compact_shrinks_and_is_refused_while_mounted(store_path, tmp_path, kernel):
    for vm in ("a", "b"):
        rpfs("backup", vm, f"--disk=d={random_disk(tmp_path / f'{vm}.img', 12)}", store=store_path)
    rpfs("policy", "create", "p", "--daily", "02:00", "--keep-last", "1", store=store_path)
    rpfs("protect", "a", "--policy", "p", f"--disk=d={tmp_path / 'a.img'}", store=store_path)
    rpfs("unprotect", "a", "--delete-data", store=store_path)
    rpfs("gc", store=store_path)
    with mounted(store_path, tmp_path / "mnt"):
        done = rpfs("compact", store=store_path, check=False)
        assert done.returncode != 0 and "open in another process" in done.stderr
    out = json.loads(rpfs("compact", "--json", store=store_path).stdout)
    assert out["after_bytes"] < out["before_bytes"] - 10 * MiB
    assert json.loads(rpfs("verify", "--json", store=store_path).stdout)["damaged"] == {}
    restored = tmp_path / "b-restored.img"
    rpfs("restore", "b", "--disk", "d", "--to", str(restored), store=store_path)
    assert restored.read_bytes() == (tmp_path / "b.img").read_bytes()
