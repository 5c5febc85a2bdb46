"""Full restore: exact bytes, sparse files, block devices, and targets that must be refused untouched."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import open_store, rpfs
from diskimages import (
    make_empty_image,
    make_gpt_image,
    make_mbr_image,
    make_odd_size_image,
    make_sparse_image,
    make_whole_disk_ext4,
    random_files,
)

from rpfs.restore.full import restore_disk
from rpfs.restore.writable_image import InstantSource, create

MiB = 1 << 20


@pytest.fixture
def vm(tmp_path):
    disks = {
        "os": make_gpt_image(tmp_path / "os.img", random_files(1), random_files(2)),
        "mbr": make_mbr_image(tmp_path / "mbr.img", random_files(3)),
        "whole": make_whole_disk_ext4(tmp_path / "whole.img", random_files(4)),
        "odd": make_odd_size_image(tmp_path / "odd.img"),
        "sparse": make_sparse_image(tmp_path / "sparse.img"),
        "empty": make_empty_image(tmp_path / "empty.img"),
    }
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", *[f"--disk={n}={p}" for n, p in disks.items()], store=store)
    return store, disks


def same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def test_restore_every_disk_to_a_folder(vm, tmp_path):
    store, disks = vm
    out = json.loads(rpfs("restore", "vm", "--to", str(tmp_path / "out"), "--json", store=store).stdout)
    assert sorted(d["disk"] for d in out["disks"]) == sorted(disks)
    for name, source in disks.items():
        restored = tmp_path / "out" / f"{name}.img"
        assert restored.stat().st_size == source.stat().st_size
        assert same_file(restored, source), name
    assert not list((tmp_path / "out").glob("*.rpfs-partial"))


def test_a_restored_image_is_root_s_alone_unless_mode_says(vm, tmp_path):
    store, disks = vm
    name = sorted(disks)[0]
    rpfs("restore", "vm", "--disk", name, "--to", str(tmp_path / "a.img"), store=store)
    rpfs("restore", "vm", "--disk", name, "--to", str(tmp_path / "b.img"), "--mode", "640", store=store)
    assert (tmp_path / "a.img").stat().st_mode & 0o7777 == 0o600
    assert (tmp_path / "b.img").stat().st_mode & 0o7777 == 0o640 and same_file(tmp_path / "b.img", disks[name])
    bad = rpfs("restore", "vm", "--disk", name, "--to", str(tmp_path / "c.img"), "--mode", "4755", store=store,
               check=False)
    assert bad.returncode == 2 and "not a file mode" in bad.stderr and not (tmp_path / "c.img").exists()


def test_holes_stay_holes(vm, tmp_path):
    store, disks = vm
    restored = tmp_path / "restored-sparse.img"
    rpfs("restore", "vm", "--disk", "sparse", "--to", str(restored), store=store)
    allocated = restored.stat().st_blocks * 512
    with open_store(store) as s:
        disk = s.point("vm").disk("sparse")
    data_bytes = (disk.blocks - disk.zero_blocks) * disk.block_size
    assert restored.stat().st_size == 1 << 30
    assert allocated <= data_bytes + MiB, (allocated, data_bytes)


def test_existing_target_is_refused_untouched_unless_forced(vm, tmp_path):
    store, disks = vm
    target = tmp_path / "restored-odd.img"
    target.write_bytes(b"precious")
    done = rpfs("restore", "vm", "--disk", "odd", "--to", str(target), store=store, check=False)
    assert done.returncode != 0 and "already exists" in done.stderr and done.stderr.count("\n") == 1
    assert target.read_bytes() == b"precious"
    rpfs("restore", "vm", "--disk", "odd", "--to", str(target), "--force", store=store)
    assert same_file(target, disks["odd"])


def test_interrupted_restore_leaves_no_file(vm, tmp_path, monkeypatch):
    store, _ = vm
    import rpfs.restore.full as restore_mod
    calls = {"n": 0}

    def failing_write(fd, bs, size, index, fut, holes):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(fd, bs, size, index, fut, holes)

    real = restore_mod._write_block
    monkeypatch.setattr(restore_mod, "_write_block", failing_write)
    target = tmp_path / "restored-os.img"
    with open_store(store) as s, pytest.raises(KeyboardInterrupt):
        restore_disk(s, s.point("vm"), "os", target)
    assert not target.exists() and not list(tmp_path.glob("*.rpfs-partial"))


def test_a_dead_restores_partial_file_is_taken_over(vm, tmp_path):
    """kill -9 leaves PATH.rpfs-partial with nobody holding it: the same command again finishes the job."""
    store, disks = vm
    target = tmp_path / "restored-odd.img"
    leftover = target.with_name(target.name + ".rpfs-partial")
    leftover.write_bytes(b"half a copy" * 100000)
    rpfs("restore", "vm", "--disk", "odd", "--to", str(target), store=store)
    assert same_file(target, disks["odd"]) and not leftover.exists()
    assert target.stat().st_mode & 0o777 == 0o600


def test_restores_never_share_a_partial_file(vm, tmp_path):
    """An unfinished instant restore's partial file holds the user's writes; a running restore's is its own."""
    store, disks = vm
    target = tmp_path / "busy.img"
    unfinished_instant_restore(store, target)
    partial = target.with_name(target.name + ".rpfs-partial")
    with open(partial, "r+b") as f:
        f.write(b"the user's write")
    for force in ([], ["--force"]):
        done = rpfs("restore", "vm", "--disk", "odd", "--to", str(target), *force, store=store, check=False)
        assert done.returncode != 0 and "unfinished instant restore" in done.stderr and done.stderr.count("\n") == 1
    assert partial.read_bytes()[:16] == b"the user's write" and not target.exists()

    other = tmp_path / "other.img"
    with partial_held_by_another_process(other.with_name(other.name + ".rpfs-partial")) as held:
        for command in (["restore", "vm", "--disk", "odd", "--to", str(other)],
                        ["instant-restore", "vm", "--disk", "odd", "--to", str(other)]):
            done = rpfs(*command, store=store, check=False)
            assert done.returncode != 0 and "another restore is writing" in done.stderr, done.stderr
        assert held.read_bytes() == b"being written" and not other.exists()


def test_a_planted_partial_file_is_replaced_not_reused(vm, tmp_path):
    """Someone else's file at the partial path (another owner, an open fd, a hard link) never carries over."""
    store, disks = vm
    target = tmp_path / "restored.img"
    planted = target.with_name(target.name + ".rpfs-partial")
    planted.write_bytes(b"planted")
    os.chown(planted, 65534, 65534)
    kept_open = open(planted, "rb")
    try:
        rpfs("restore", "vm", "--disk", "odd", "--to", str(target), store=store)
        assert os.fstat(kept_open.fileno()).st_ino != target.stat().st_ino
        assert kept_open.read() == b"planted"
    finally:
        kept_open.close()
    assert target.stat().st_uid == os.geteuid() and same_file(target, disks["odd"])


@pytest.mark.timeout(60)
def test_a_planted_fifo_at_the_partial_path_is_refused_at_once(vm, tmp_path):
    store, _ = vm
    target = tmp_path / "restored.img"
    os.mkfifo(target.with_name(target.name + ".rpfs-partial"))
    done = rpfs("restore", "vm", "--disk", "odd", "--to", str(target), store=store, check=False, timeout=30)
    assert done.returncode != 0 and "not a regular file" in done.stderr and not target.exists()


def test_an_instant_restore_killed_while_finishing_is_settled(vm, tmp_path):
    """Killed between renaming its copy into place and deleting its state file: the state is stale once
    nobody serves the image, and only then."""
    store, disks = vm
    target = tmp_path / "instant.img"
    unfinished_instant_restore(store, target)
    state = target.with_name(target.name + ".rpfs-instant")
    target.with_name(target.name + ".rpfs-partial").rename(target)   # the daemon's last rename, then killed
    with partial_held_by_another_process(target):                    # ... or still serving the image
        done = rpfs("restore", "vm", "--disk", "odd", "--to", str(target), "--force", store=store, check=False)
        assert done.returncode != 0 and "unfinished instant restore" in done.stderr and state.exists()
    rpfs("restore", "vm", "--disk", "odd", "--to", str(target), "--force", store=store)
    assert not state.exists() and same_file(target, disks["odd"])


def test_a_planted_link_at_the_partial_path_is_not_followed(vm, tmp_path):
    store, _ = vm
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    target = tmp_path / "restored.img"
    target.with_name(target.name + ".rpfs-partial").symlink_to(victim)
    done = rpfs("restore", "vm", "--disk", "odd", "--to", str(target), store=store, check=False)
    assert done.returncode != 0 and done.stderr.count("\n") == 1
    assert victim.read_bytes() == b"not yours" and not target.exists()


def unfinished_instant_restore(store: Path, target: Path) -> None:
    """What `rpfs instant-restore` leaves when its daemon is gone before copying anything."""
    with open_store(store) as s:
        point = s.point("vm")
        disk = point.disk("odd")
        create(target, InstantSource(str(s.path), point.vm, point.id, disk.name, disk.size, disk.block_size))


@contextmanager
def partial_held_by_another_process(path: Path):
    """A partial file written by another restore: it holds the flock the protocol takes."""
    if not path.exists():
        path.write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys\nf = open(sys.argv[1], 'rb')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield path
    finally:
        holder.communicate("", timeout=30)


def test_unknown_disk_and_point(vm, tmp_path):
    store, _ = vm
    done = rpfs("restore", "vm", "--disk", "nope", "--to", str(tmp_path / "x.img"), store=store, check=False)
    assert done.returncode != 0 and "no disk 'nope'" in done.stderr
    done = rpfs("restore", "vm", "1999-01-01T000000Z", "--to", str(tmp_path / "x"), store=store, check=False)
    assert done.returncode != 0 and "no recovery point" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.img").exists()


@contextmanager
def loop_device(backing: Path):
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        yield Path(loop)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("discard", [False, True])
def test_restore_onto_a_block_device(vm, tmp_path, kernel, discard):
    store, disks = vm
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xff" * (8 * MiB))   # old contents where the disk has holes must not survive
    with loop_device(backing) as device:
        args = ["restore", "vm", "--disk", "odd", "--to", str(device)] + (["--discard"] if discard else [])
        rpfs(*args, store=store)
        size = disks["odd"].stat().st_size
        with open(device, "rb") as f:
            assert f.read(size) == disks["odd"].read_bytes()


@pytest.mark.timeout(120)
def test_discard_on_a_loop_device_frees_its_backing_file(tmp_path, kernel):
    """What the admin did: a disk mostly holes restored with --discard onto a loop device over a fully
    allocated file: the file shrinks (plain BLKZEROOUT kept it allocated), and every byte reads right."""
    store = tmp_path / "store"
    rpfs("init", store=store)
    disk = tmp_path / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(2 * MiB))
    rpfs("backup", "vm", "--disk", f"os={disk}", store=store)
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xff" * (32 * MiB))
    assert backing.stat().st_blocks * 512 >= 32 * MiB
    with loop_device(backing) as device:
        done = json.loads(rpfs("restore", "vm", "--disk", "os", "--to", str(device), "--discard", "--json",
                               store=store).stdout)["disks"][0]
        assert done["discarded_bytes"] == 30 * MiB and done["zeroed_bytes"] == 0
        with open(device, "rb") as f:
            assert f.read(32 * MiB) == disk.read_bytes()
        said = rpfs("restore", "vm", "--disk", "os", "--to", str(device), "--discard", store=store).stdout
        assert "30.0 MiB discarded, 0 B zeroed" in said
    assert backing.stat().st_blocks * 512 <= 3 * MiB   # the data and a little: the holes are freed


@pytest.mark.timeout(120)
def test_too_small_or_mounted_device_is_refused(vm, tmp_path, kernel):
    store, _ = vm
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    with loop_device(small) as device:
        done = rpfs("restore", "vm", "--disk", "odd", "--to", str(device), store=store, check=False)
        assert done.returncode != 0 and "too small" in done.stderr
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(big)], check=True)
    with loop_device(big) as device:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", str(device), str(mnt)], check=True)
        try:
            done = rpfs("restore", "vm", "--disk", "odd", "--to", str(device), store=store, check=False)
            assert done.returncode != 0 and "in use" in done.stderr
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.timeout(120)
def test_a_device_holding_a_filesystem_needs_force(vm, tmp_path, kernel):
    store, disks = vm
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-L", "keepme", str(backing)], check=True)
    with loop_device(backing) as device:
        done = rpfs("restore", "vm", "--disk", "odd", "--to", str(device), store=store, check=False)
        assert done.returncode != 0 and "ext4 filesystem labelled 'keepme'" in done.stderr and "--force" in done.stderr
        assert subprocess.run(["blkid", "-p", str(device)], capture_output=True).returncode == 0   # untouched
        rpfs("restore", "vm", "--disk", "odd", "--to", str(device), "--force", store=store)
        with open(device, "rb") as f:
            assert f.read(disks["odd"].stat().st_size) == disks["odd"].read_bytes()
