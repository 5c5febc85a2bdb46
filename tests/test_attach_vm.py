"""Whole-VM attach: every filesystem of every disk of a recovery point, read-only, under DEST/<disk>/."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import is_mounted, mounted, open_store, rpfs
from diskimages import (
    leftover_kernel_state,
    make_blank_partitioned_image,
    make_dirty_image,
    make_gpt_image,
    make_whole_disk_ext4,
    mounted_rw,
    needs_log_recovery,
    random_files,
    read_tree,
)

import rpfs.attach.filesystems as attach_mod
from rpfs.attach.filesystems import attach_disks, detach
from rpfs.errors import RpfsError

MiB = 1 << 20


def backup_vm(area: Path, disks: dict[str, Path]) -> Path:
    """A store holding one recovery point of VM "vm" with these disks."""
    store = area / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", *[f"--disk={name}={path}" for name, path in disks.items()], store=store)
    return store


def latest_images(mnt: Path, disks: dict[str, Path]) -> dict[str, Path]:
    return {name: mnt / "vm" / "latest" / f"{name}.img" for name in disks}


def loop_mounts_under(area: Path) -> list[str]:
    """Loop mounts and loop devices still involving area (the store's FUSE mount is left out)."""
    loops, mounts = leftover_kernel_state(area)
    return loops + [m for m in mounts if m.startswith("/dev/loop")]


def loop_of(mountpoint: Path) -> Path:
    """/sys/block/loopN of the loop device mounted at mountpoint."""
    with open("/proc/self/mounts") as f:
        source = next(line.split()[0] for line in f if line.split()[1] == str(mountpoint))
    return Path("/sys/block") / Path(source).name


# ---------------------------------------------------------------- argument checks, no kernel needed

def test_attach_disks_checks_its_arguments(tmp_path):
    dest = tmp_path / "dest"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    with pytest.raises(RpfsError, match="no disks to attach"):
        attach_disks({}, dest)
    for bad in ("", "a/b", "..", ".hidden", "latest"):
        with pytest.raises(RpfsError, match="invalid disk name"):
            attach_disks({"os": image, bad: image}, dest)
    with pytest.raises(RpfsError, match="does not exist"):
        attach_disks({"os": image, "data": tmp_path / "missing.img"}, dest)
    with pytest.raises(RpfsError, match="is a directory"):
        attach_disks({"os": tmp_path}, dest)
    assert not dest.exists()


# ---------------------------------------------------------------- through a mounted store

@pytest.mark.timeout(180)
def test_attach_every_disk_of_a_recovery_point(area):
    os_p1, os_p2, data = random_files(21), random_files(22), random_files(23)
    disks = {"os": make_gpt_image(area / "os.img", os_p1, os_p2),
             "data": make_whole_disk_ext4(area / "data.img", data)}
    store = backup_vm(area, disks)
    dest = area / "dest"
    with mounted(store, area / "store-mnt") as mnt:
        attached = attach_disks(latest_images(mnt, disks), dest)
        try:
            assert list(attached) == ["os", "data"]
            assert [(a.name, a.fstype, a.status, a.mountpoint) for a in attached["os"]] == [
                ("p1", "ext4", "mounted", str(dest / "os" / "p1")),
                ("p2", "xfs", "mounted", str(dest / "os" / "p2"))]
            assert [(a.name, a.fstype, a.status, a.mountpoint) for a in attached["data"]] == [
                ("disk", "ext4", "mounted", str(dest / "data" / "disk"))]
            assert read_tree(dest / "os" / "p1") == os_p1
            assert read_tree(dest / "os" / "p2") == os_p2
            assert read_tree(dest / "data" / "disk") == data
            for mountpoint in (dest / "os" / "p1", dest / "os" / "p2", dest / "data" / "disk"):
                loop = loop_of(mountpoint)
                assert (loop / "ro").read_text().strip() == "1"
                assert (loop / "loop" / "backing_file").read_text().startswith(str(mnt / "vm")), \
                    "should read through the store mount"
            with pytest.raises(OSError):
                (dest / "data" / "disk" / "new-file").write_bytes(b"x")
        finally:
            unmounted = detach(dest)
        assert sorted(unmounted) == sorted(str(dest / p) for p in ("os/p1", "os/p2", "data/disk"))
        assert loop_mounts_under(area) == []
        assert dest.is_dir() and os.listdir(dest) == []
        with pytest.raises(RpfsError, match="nothing attached at"):
            detach(dest)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_crash_consistent_image_attaches_through_the_store(area, fstype):
    """A copy of a live filesystem: its journal/log is not replayed, yet it mounts and reads.

    Files written before a clean unmount are checkpointed and must read back exactly; files
    written afterwards may exist only in the unreplayed journal, so they may be missing.
    """
    settled = random_files(31, count=6)
    recent = {f"recent/{name}": data for name, data in random_files(32, count=4, subdirs=False).items()}
    image = make_dirty_image(area / f"{fstype}.img", recent, fstype, settled=settled)
    assert needs_log_recovery(image, fstype), "fixture should need journal/log recovery"
    disks = {"crashed": image}
    store = backup_vm(area, disks)
    dest = area / "dest"
    with mounted(store, area / "store-mnt") as mnt:
        attached = attach_disks(latest_images(mnt, disks), dest)
        try:
            assert [(a.name, a.fstype, a.status) for a in attached["crashed"]] == [("disk", fstype, "mounted")]
            root = dest / "crashed" / "disk"
            assert {name: (root / name).read_bytes() for name in settled} == settled
            assert set(os.listdir(root)) <= {"lost+found", "recent", *(n.split("/")[0] for n in settled)}
        finally:
            detach(dest)
        assert loop_mounts_under(area) == []
        assert os.listdir(dest) == []


@pytest.mark.timeout(180)
def test_disk_without_a_filesystem_is_reported_and_the_others_mounted(area):
    data = random_files(41, count=3)
    disks = {"scratch": make_blank_partitioned_image(area / "scratch.img"),
             "data": make_whole_disk_ext4(area / "data.img", data)}
    store = backup_vm(area, disks)
    dest = area / "dest"
    with mounted(store, area / "store-mnt") as mnt:
        attached = attach_disks(latest_images(mnt, disks), dest)
        try:
            assert [(a.name, a.status, a.mountpoint) for a in attached["scratch"]] == [
                ("p1", "no filesystem detected", None), ("p2", "no filesystem detected", None)]
            assert [a.status for a in attached["data"]] == ["mounted"]
            assert os.listdir(dest) == ["data"]
            assert read_tree(dest / "data" / "disk") == data
        finally:
            detach(dest)
        assert loop_mounts_under(area) == []


# ---------------------------------------------------------------- plain image files

@pytest.mark.timeout(120)
def test_unreadable_disk_is_reported_as_a_whole(area):
    broken = make_blank_partitioned_image(area / "broken.img")
    size = broken.stat().st_size
    with open(broken, "r+b") as f:  # protective MBR left, both GPT headers gone
        f.seek(512)
        f.write(bytes(512))
        f.seek(size - 512)
        f.write(bytes(512))
    good = make_whole_disk_ext4(area / "good.img", {"a.txt": b"a"})
    dest = area / "dest"
    attached = attach_disks({"broken": broken, "good": good}, dest)
    try:
        [whole] = attached["broken"]
        assert (whole.name, whole.mountpoint, whole.size) == ("disk", None, size)
        assert "no valid GPT header" in whole.status
        assert os.listdir(dest) == ["good"]
        assert (dest / "good" / "disk" / "a.txt").read_bytes() == b"a"
    finally:
        detach(dest)


@pytest.mark.timeout(120)
def test_no_disk_mountable_leaves_nothing_behind(area):
    disks = {"a": make_blank_partitioned_image(area / "a.img"), "b": make_blank_partitioned_image(area / "b.img")}
    with pytest.raises(RpfsError, match=r"no filesystem found in any disk .*\(a p1: no filesystem detected;"
                                        r".* b p2: no filesystem detected\)"):
        attach_disks(disks, area / "new" / "dest")
    assert not (area / "new").exists()
    existing = area / "existing"
    existing.mkdir()
    with pytest.raises(RpfsError, match="no filesystem found in any disk"):
        attach_disks(disks, existing)
    assert os.listdir(existing) == []


@pytest.mark.timeout(120)
def test_interrupted_vm_attach_undoes_every_disk(area, monkeypatch):
    """Ctrl-C while the second disk's second partition is probed: the first disk and p1 are undone."""
    disks = {"first": make_whole_disk_ext4(area / "first.img", {"a": b"a"}),
             "second": make_gpt_image(area / "second.img", {"b": b"b"}, {"c": b"c"})}
    real_probe = attach_mod._probe

    def probe_then_interrupt(image, offset, size):
        if image.name == "second.img" and offset > 2 * MiB:
            raise KeyboardInterrupt
        return real_probe(image, offset, size)

    monkeypatch.setattr(attach_mod, "_probe", probe_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        attach_disks(disks, area / "dest")
    assert not (area / "dest").exists()
    assert loop_mounts_under(area) == []


@pytest.mark.timeout(120)
def test_detach_leaves_foreign_mounts_below_dest_alone(area):
    """A writable loop mount named p1 below dest is not attach's: detach must not touch it."""
    ours = make_whole_disk_ext4(area / "ours.img", {"a": b"a"})
    theirs = make_whole_disk_ext4(area / "theirs.img", {"b": b"b"})
    dest = area / "dest"
    attach_disks({"ours": ours}, dest)
    try:
        (dest / "extra").mkdir()
        with mounted_rw(theirs, dest / "extra" / "p1") as foreign:
            assert detach(dest) == [str(dest / "ours" / "disk")]
            assert is_mounted(foreign) and (foreign / "b").read_bytes() == b"b"
            with pytest.raises(RpfsError, match="nothing attached at"):
                detach(dest)
        assert os.listdir(dest) == ["extra"]
    finally:
        if is_mounted(dest / "ours" / "disk"):
            detach(dest)


@pytest.mark.timeout(180)
def test_whole_vm_attach_run_again_completes_what_a_killed_one_left(area):
    """`rpfs attach VM DEST` killed after its store mount and the first disk's filesystem: run again, it
    mounts the rest through the same store mount (found by tools/chaos); another point is refused."""
    from rpfs.host import run_dir
    from rpfs.serve import daemon

    os_files, data_files = random_files(51, count=2), random_files(52, count=2)
    disks = {"os": make_whole_disk_ext4(area / "os.img", os_files),
             "data": make_whole_disk_ext4(area / "data.img", data_files)}
    store = backup_vm(area, disks)
    first = json.loads(rpfs("list", "vm", "--json", store=store).stdout)[0]["id"]
    rpfs("backup", "vm", *[f"--disk={name}={path}" for name, path in disks.items()], store=store)
    dest = area / "dest"
    registry, store_mount = run_dir.attach_files(dest)
    rpfs("attach", "vm", str(dest), store=store)
    try:
        serving = daemon.daemon_pid(store_mount)
        subprocess.run(["umount", str(dest / "data" / "disk")], check=True)   # as if killed before that mount
        again = json.loads(rpfs("attach", "vm", str(dest), "--json", store=store).stdout)
        assert [(d["disk"], [f["status"] for f in d["filesystems"]]) for d in again["disks"]] == [
            ("os", ["mounted"]), ("data", ["mounted"])]
        assert read_tree(dest / "os" / "disk") == os_files and read_tree(dest / "data" / "disk") == data_files
        assert daemon.daemon_pid(store_mount) == serving
        other = rpfs("attach", f"vm/{first}", str(dest), store=store, check=False)
        assert other.returncode == 1 and "already has something attached" in other.stderr
        assert read_tree(dest / "data" / "disk") == data_files
    finally:
        rpfs("detach", str(dest))
    assert loop_mounts_under(area) == [] and not is_mounted(store_mount) and not registry.exists()
    assert os.listdir(dest) == []


@pytest.mark.timeout(180)
def test_whole_vm_attach_run_again_uses_the_store_mount_a_killed_one_is_starting(area, monkeypatch):
    """`rpfs attach VM DEST` killed while its store-mount daemon starts: that daemon goes on and mounts.
    Run again at once, attach must wait for it and use it, not start a second daemon on the same
    mountpoint (found by tools/chaos: "the mount daemon exited")."""
    import sys
    import time

    from cli_helpers import REPO

    from rpfs.attach import vm
    from rpfs.host import run_dir
    from rpfs.serve import daemon

    files = random_files(53, count=2)
    store = backup_vm(area, {"d": make_whole_disk_ext4(area / "d.img", files)})
    dest = area / "dest"
    registry, store_mount = run_dir.attach_files(dest)
    run_dir.write_file(registry, json.dumps({"dest": str(dest), "store_mount": str(store_mount)}))
    run_dir.make_folder(store_mount)
    # The daemon the killed attach started, held at its start until attach, run again, looks for it.
    starting = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; sys.stdin.readline();"
         " os.execv(sys.executable, [sys.executable, '-m', 'rpfs', *sys.argv[2:]])",
         "rpfs", "--store", str(store), "mount", os.path.realpath(store_mount), "--foreground", "--cache-mb", "64"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        start_new_session=True)
    real_sleep = time.sleep

    def sleep_lets_it_start(seconds: float) -> None:
        if not starting.stdin.closed:
            starting.stdin.close()
        real_sleep(seconds)
    try:
        with monkeypatch.context() as patch, open_store(store, readonly=True) as opened:
            patch.setattr(time, "sleep", sleep_lets_it_start)   # attach polls with it while the daemon starts
            attached = vm.attach_point(opened, opened.points("vm")[0], dest)
        assert [a.status for a in attached["d"]] == ["mounted"] and read_tree(dest / "d" / "disk") == files
        assert daemon.daemon_pid(store_mount) == starting.pid
    finally:
        rpfs("detach", str(dest), check=False)
        if starting.poll() is None and daemon.daemon_pid(store_mount) != starting.pid:
            starting.kill()
        starting.wait(timeout=30)
    assert loop_mounts_under(area) == [] and not is_mounted(store_mount) and not registry.exists()
