"""Instant restore and the VM way (qcow2 over the mount), on real loop devices, FUSE and ext4."""
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cli_helpers import mounted, open_store, rpfs
from conftest import require_tool
from diskimages import leftover_kernel_state, make_whole_disk_ext4, random_disk, random_files

from rpfs.restore.partial import state_path

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("kernel")]
MiB = 1 << 20


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def cleanup(tmp_path):
    """Whatever a test leaves (loop devices over the image, instant restores), undone afterwards."""
    targets: list[Path] = []
    yield targets
    for target in targets:
        rpfs("instant-stop", str(target), check=False)
    loops, mounts = leftover_kernel_state(under=tmp_path)
    assert (loops, mounts) == ([], [])


def backed_up_disk(tmp_path: Path, data_mib: int) -> tuple[Path, Path]:
    """(store, disk): a store holding one backup of a disk of random data."""
    source = random_disk(tmp_path / "disk.img", data_mib)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={source}", store=store)
    return store, source


def start_instant(store: Path, target: Path, cleanup: list, *extra: str) -> dict:
    cleanup.append(target)
    return json.loads(rpfs("instant-restore", "vm", "--disk", "d", "--to", str(target), "--json", *extra,
                          store=store).stdout)


def test_write_to_the_instant_image_then_copy_completes(tmp_path, cleanup):
    files = random_files(60, count=40, max_size=2 * MiB)
    image = make_whole_disk_ext4(tmp_path / "disk.img", files, size=160 * MiB)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    target = tmp_path / "restored.img"
    job = start_instant(store, target, cleanup)
    assert Path(job["image"]).stat().st_size == image.stat().st_size

    loop = run("losetup", "--find", "--show", job["image"]).strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    written = {"new/hello.txt": b"written during the instant restore\n", "file000.bin": os.urandom(300000)}
    try:
        run("mount", loop, str(mnt))
        try:
            for name, data in written.items():
                (mnt / name).parent.mkdir(exist_ok=True)
                (mnt / name).write_bytes(data)
        finally:
            run("umount", str(mnt))
    finally:
        run("losetup", "-d", loop)

    done = json.loads(rpfs("instant-wait", str(target), "--json").stdout)
    assert done["state"] == "complete" and not state_path(target).exists()
    rpfs("instant-stop", str(target))
    run("fsck.ext4", "-fn", str(target))
    expected = {**files, **written}
    with mounted_image(target, tmp_path / "check") as check:
        for name, data in expected.items():
            assert (check / name).read_bytes() == data, name


class mounted_image:
    def __init__(self, image: Path, mountpoint: Path):
        self.image, self.mountpoint = image, mountpoint

    def __enter__(self) -> Path:
        self.mountpoint.mkdir()
        run("mount", "-o", "ro,loop", str(self.image), str(self.mountpoint))
        return self.mountpoint

    def __exit__(self, *exc) -> None:
        run("umount", str(self.mountpoint))


def test_killed_daemon_resumes_without_losing_writes(tmp_path, cleanup):
    source = random_disk(tmp_path / "big.img", 1024)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={source}", store=store)
    target = tmp_path / "restored.img"
    job = start_instant(store, target, cleanup, "--copy-mbps", "20")   # 50 s for the copy: it is still going
    patches = {5 * MiB + 100: b"A" * 5000, 700 * MiB: b"B" * MiB, 1023 * MiB + 4000: b"C" * 999}
    fd = os.open(job["image"], os.O_RDWR)
    try:
        for offset, data in patches.items():
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.kill(job["pid"], signal.SIGKILL)
    assert state_path(target).exists(), "the copy finished before the daemon could be killed"
    listed = json.loads(rpfs("jobs", "--json").stdout)["instant_restores"]
    assert [j["state"] for j in listed if j["target"] == str(target)] == ["stopped"]

    start_instant(store, target, cleanup, "--wait")
    expected = bytearray(source.read_bytes())
    for offset, data in patches.items():
        expected[offset:offset + len(data)] = data
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(expected).digest()


def test_new_target_must_not_exist(tmp_path, cleanup):
    image = make_whole_disk_ext4(tmp_path / "disk.img", random_files(61, count=2))
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    done = rpfs("instant-restore", "vm", "--disk", "d", "--to", str(image), store=store, check=False)
    assert done.returncode != 0 and "already exists" in done.stderr and done.stderr.count("\n") == 1


def test_qcow2_overlay_on_the_mount(tmp_path, cleanup):
    """The VM way: `rpfs overlay` backs a qcow2 with the point's own image under the mount, never with
    `latest`, so a later backup does not change the disk under the VM (issue 9, defect 10)."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    source = tmp_path / "disk.img"
    source.write_bytes(os.urandom(6 * MiB) + bytes(2 * MiB))
    original = source.read_bytes()
    store = tmp_path / "store"
    rpfs("init", store=store)
    first = json.loads(rpfs("backup", "vm", f"--disk=d={source}", "--json", store=store).stdout)["point_id"]
    with mounted(store, tmp_path / "rp") as rp:
        overlay = tmp_path / "overlay.qcow2"
        made = json.loads(rpfs("overlay", "vm", "--disk", "d", "--mount", str(rp), "--to", str(overlay), "--json",
                               store=store).stdout)
        assert made["recovery_point"] == first and made["backing"] == str(rp / "vm" / first / "d.img")
        assert json.loads(run("qemu-img", "info", "--output=json", str(overlay)))["backing-filename"] == made["backing"]
        run("qemu-io", "-c", "write -P 0xab 1M 64k", str(overlay))
        source.write_bytes(os.urandom(8 * MiB))                 # the VM's disk moves on, and is backed up
        rpfs("backup", "vm", f"--disk=d={source}", store=store)
        flat = tmp_path / "flat.raw"
        run("qemu-img", "convert", "-O", "raw", str(overlay), str(flat))
        done = rpfs("overlay", "vm", "--disk", "d", "--mount", str(rp), "--to", str(overlay), store=store, check=False)
        assert done.returncode != 0 and "already exists" in done.stderr
    expected = bytearray(original)
    expected[MiB:MiB + 65536] = b"\xab" * 65536
    assert flat.read_bytes() == bytes(expected)
    assert [p["pinned"] for p in json.loads(rpfs("list", "--json", store=store).stdout)] == [True, False]


def test_prune_keeps_the_point_of_an_unfinished_instant_restore(tmp_path, cleanup):
    store = tmp_path / "store"
    rpfs("init", store=store)
    source = random_disk(tmp_path / "big.img", 768)
    first = json.loads(rpfs("backup", "vm", f"--disk=d={source}", "--json", store=store).stdout)["point_id"]
    random_disk(tmp_path / "small.img", 1)
    rpfs("backup", "vm", f"--disk=d={tmp_path / 'small.img'}", store=store)
    rpfs("policy", "create", "one", "--daily", "02:00", "--keep-last", "1", store=store)
    rpfs("protect", "vm", "--policy", "one", f"--disk=d={source}", store=store)
    target = tmp_path / "restored.img"
    cleanup.append(target)
    job = json.loads(rpfs("instant-restore", "vm", first, "--disk", "d", "--to", str(target), "--json",
                          "--copy-mbps", "20", store=store).stdout)   # the copy is still going when killed
    os.kill(job["pid"], signal.SIGKILL)          # stopped: no daemon holds a lease now
    assert state_path(target).exists(), "the copy finished before the daemon could be killed"
    kept = json.loads(rpfs("prune", "--json", store=store).stdout)[0]
    assert kept["pruned"] == [] and kept["kept"][first] == "in use by an unfinished instant restore"
    rpfs("instant-restore", "vm", first, "--disk", "d", "--to", str(target), "--wait", store=store)
    rpfs("instant-stop", str(target))
    assert target.read_bytes() == source.read_bytes()
    assert json.loads(rpfs("prune", "--json", store=store).stdout)[0]["pruned"] == [first]


def test_instant_wait_says_what_to_do_when_something_still_runs_on_the_image(tmp_path, cleanup):
    """A VM on the served image stays on the daemon after the copy: instant-wait names it and says what to do."""
    store, _source = backed_up_disk(tmp_path, 8)
    target = tmp_path / "restored.img"
    job = start_instant(store, target, cleanup)
    holder = subprocess.Popen(["bash", "-c", 'exec 3<>"$1"; echo ready; exec sleep 60', "-", job["image"]],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        said = rpfs("instant-wait", str(target)).stdout
        assert f"sleep (pid {holder.pid}) still use(s) {job['image']}" in said, said
        assert f"start it on {target}, then rpfs instant-stop {target}" in said
    finally:
        holder.kill()
        holder.wait()
    said = rpfs("instant-wait", str(target)).stdout
    assert said.startswith(f"copy complete: {target} is a standalone image (stop serving")


def test_run_again_as_the_copy_completes_returns_the_finished_job(tmp_path, cleanup, monkeypatch):
    """The same instant-restore run again reads the state file just before the copy completes: it returns
    the finished job and leaves no hold behind (found by tools/chaos)."""
    from rpfs.restore import instant
    from rpfs.store.leases import holds

    store, source = backed_up_disk(tmp_path, 8)
    target = tmp_path / "restored.img"
    start_instant(store, target, cleanup, "--copy-mbps", "4")
    read_before_the_end = instant.read_source(target)
    rpfs("instant-wait", str(target))
    assert not state_path(target).exists() and holds(store) == {}
    monkeypatch.setattr(instant, "unfinished_source", lambda _target: read_before_the_end)
    with open_store(store, readonly=True) as opened:
        job = instant.start(opened, opened.points("vm")[0], "d", target)
    assert job.state == "complete" and holds(store) == {}
    assert target.read_bytes() == source.read_bytes()


def test_discard_abandons_an_unfinished_instant_restore(tmp_path, cleanup):
    """`instant-stop --discard` removes the copy, its state file, the hold and the record; refused while
    the image is in use, and when there is nothing to discard."""
    from rpfs.host import run_dir
    from rpfs.store.leases import holds

    store, source = backed_up_disk(tmp_path, 64)
    target = tmp_path / "restored.img"
    job = start_instant(store, target, cleanup, "--copy-mbps", "4")   # 16 s for the copy: unfinished
    fd = os.open(job["image"], os.O_RDWR)
    try:
        os.pwrite(fd, b"W" * 4096, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    loop = run("losetup", "--find", "--show", job["image"]).strip()
    try:
        busy = rpfs("instant-stop", str(target), "--discard", check=False)
    finally:
        run("losetup", "-d", loop)
    assert busy.returncode == 1 and f"busy: used by {loop}" in busy.stderr and busy.stderr.count("\n") == 1
    assert state_path(target).exists() and list(holds(store))

    done = json.loads(rpfs("instant-stop", str(target), "--discard", "--json").stdout)
    registry = run_dir.instant_files(target)[0]
    assert done["was"] == "unfinished" and done["removed"] == [
        str(state_path(target)), f"{target}.rpfs-partial", str(store / "leases" / f"hold-{registry.stem}"),
        str(registry)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "run", "store"]
    assert holds(store) == {} and not registry.exists() and not registry.with_suffix("").exists()
    assert json.loads(rpfs("jobs", "--json").stdout)["instant_restores"] == []
    again = rpfs("instant-stop", str(target), "--discard", check=False)
    assert again.returncode == 1 and "no instant restore" in again.stderr and again.stderr.count("\n") == 1
    rpfs("instant-restore", "vm", "--disk", "d", "--to", str(target), "--wait", store=store)   # the path is free
    kept = json.loads(rpfs("instant-stop", str(target), "--discard", "--json").stdout)
    assert kept["was"] == "complete" and kept["removed"] == [str(registry)]
    assert target.read_bytes() == source.read_bytes()


class Killed(BaseException):
    """kill -9, as far as the code under test can tell: nothing after this point runs."""


@pytest.mark.parametrize("moment", ["unmounted", "dead daemon unmounted", "state file removed",
                                    "partial file removed", "hold released"])
def test_discard_killed_at_any_moment_finishes_when_run_again(tmp_path, cleanup, monkeypatch, moment):
    """"dead daemon unmounted": its daemon killed, then the discard killed between the unmount of the dead
    mount and the removal of the daemon's pid file (found by tools/chaos: the pid file stayed)."""
    from rpfs.restore import instant, partial
    from rpfs.host import run_dir
    from rpfs.store.leases import holds

    store, source = backed_up_disk(tmp_path, 16)
    target = tmp_path / "restored.img"
    job = start_instant(store, target, cleanup, "--copy-mbps", "1")

    def dies_after(function, calls: int = 1):
        done = []

        def wrapped(*args, **kwargs):
            function(*args, **kwargs)
            done.append(1)
            if len(done) == calls:
                raise Killed
        return wrapped
    with monkeypatch.context() as patch, pytest.raises(Killed):
        if moment == "unmounted":
            patch.setattr(instant.daemon, "unmount", dies_after(instant.daemon.unmount))
        elif moment == "dead daemon unmounted":
            os.kill(job["pid"], signal.SIGKILL)
            patch.setattr(instant.daemon, "_wait_for_daemon", dies_after(lambda *_args: None))
        elif moment == "hold released":
            patch.setattr(instant, "release_hold", dies_after(instant.release_hold))
        else:   # abandon syncs the folder after each removal
            calls = 1 if moment == "state file removed" else 2
            patch.setattr(partial, "fsync_folder", dies_after(partial.fsync_folder, calls))
        instant.discard(target)
    [left] = json.loads(rpfs("jobs", "--json").stdout)["instant_restores"]
    assert left["state"] == ("stopped" if "unmounted" in moment else "discarded")
    waited = rpfs("instant-wait", str(target), check=False)
    assert waited.returncode == 1 and waited.stderr.count("\n") == 1

    done = json.loads(rpfs("instant-stop", str(target), "--discard", "--json").stdout)
    assert done["was"] == "unfinished" and done["removed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "run", "store"]
    registry, mountpoint = run_dir.instant_files(target)
    assert holds(store) == {} and not registry.exists() and not mountpoint.exists()
    assert not run_dir.daemon_files(mountpoint)[0].exists()


def test_two_daemons_for_one_image_the_command_returns_the_winners_job(tmp_path, monkeypatch):
    """instant-restore killed right after starting its daemon, then run again: two daemons start for one
    image, and the one that loses the partial file's flock fails. The command then returns the job the
    other one serves or has completed meanwhile, not the loser's error (found by tools/chaos)."""
    from rpfs.errors import RpfsError
    from rpfs.restore import instant
    from rpfs.restore.partial import partial_path
    from rpfs.restore.writable_image import InstantSource, create

    store, source = backed_up_disk(tmp_path, 4)
    with open_store(store, readonly=True) as opened:
        point = opened.point("vm")
        disk = point.disk("d")
        for target in (tmp_path / "won.img", tmp_path / "failed.img"):
            create(target, InstantSource(str(opened.path.resolve()), point.vm, point.id, disk.name, disk.size,
                                         disk.block_size))

        def the_other_one_completes(*_args):
            partial_path(target).write_bytes(source.read_bytes())
            partial_path(target).rename(target)
            state_path(target).unlink()
            raise RpfsError(f"another restore is writing {partial_path(target)}; wait for it to finish")
        target = tmp_path / "won.img"
        monkeypatch.setattr(instant.daemon, "start_daemon", the_other_one_completes)
        assert instant.start(opened, point, "d", target).state == "complete"

        def fails(*_args):
            raise RpfsError("the mount daemon exited")
        monkeypatch.setattr(instant.daemon, "start_daemon", fails)
        with pytest.raises(RpfsError, match="daemon exited"):   # nobody else serves it: the error stands
            instant.start(opened, point, "d", tmp_path / "failed.img")
