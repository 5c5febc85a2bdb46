"""The whole path users take, on real kernel parts: disk images -> backup -> FUSE mount -> attach -> files."""
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import is_mounted, mounted, open_store, rpfs
from diskimages import (
    leftover_kernel_state,
    make_empty_image,
    make_gpt_image,
    make_mbr_image,
    make_odd_size_image,
    make_sparse_image,
    make_whole_disk_ext4,
    mounted_rw,
    random_files,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("kernel")]
MiB = 1 << 20


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every regular file below root (lost+found and xfs internals aside)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def expected_digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


@pytest.fixture
def vm_disks(tmp_path):
    files = {name: random_files(seed, count=12) for seed, name in enumerate(["os-p1", "os-p2", "data", "whole"])}
    disks = {
        "os": make_gpt_image(tmp_path / "os.img", files["os-p1"], files["os-p2"]),
        "data": make_mbr_image(tmp_path / "data.img", files["data"]),
        "whole": make_whole_disk_ext4(tmp_path / "whole.img", files["whole"]),
        "odd": make_odd_size_image(tmp_path / "odd.img"),
        "sparse": make_sparse_image(tmp_path / "sparse.img"),
        "empty": make_empty_image(tmp_path / "empty.img"),
    }
    return disks, files


@pytest.fixture
def no_leaks(tmp_path):
    yield
    loops, mounts = leftover_kernel_state(under=tmp_path)
    assert (loops, mounts) == ([], []), "the test left loop devices or mounts behind"


def test_backup_mount_attach_restore_files(tmp_path, vm_disks, no_leaks):
    disks, files = vm_disks
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "web01", *[f"--disk={name}={path}" for name, path in disks.items()], store=store)
    with mounted(store, tmp_path / "rp") as rp:
        latest = rp / "web01" / "latest"
        for name, source in disks.items():
            assert (latest / f"{name}.img").read_bytes() == source.read_bytes(), name

        expected = {"os": {"p1": files["os-p1"], "p2": files["os-p2"]},
                    "data": {"p1": files["data"]}, "whole": {"disk": files["whole"]}}
        for disk, parts in expected.items():
            dest = tmp_path / "restore" / disk
            attached = json.loads(rpfs("attach", str(latest / f"{disk}.img"), str(dest), "--json").stdout)
            try:
                mounted_parts = {a["name"] for a in attached if a["status"] == "mounted"}
                assert set(parts) <= mounted_parts, attached
                for part, part_files in parts.items():
                    assert tree_digests(dest / part) == expected_digests(part_files), (disk, part)
                    assert not os.access(dest / part, os.W_OK) or _is_read_only(dest / part)
            finally:
                rpfs("detach", str(dest))
            assert not any(dest.iterdir())

        done = rpfs("attach", str(latest / "odd.img"), str(tmp_path / "nofs"), check=False)
        assert done.returncode != 0 and "no filesystem found" in done.stderr and done.stderr.count("\n") == 1
        assert not (tmp_path / "nofs").exists()


def _is_read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def test_changed_files_store_about_the_changed_blocks(tmp_path, no_leaks):
    files = random_files(40, count=30, max_size=512 * 1024)
    image = make_whole_disk_ext4(tmp_path / "disk.img", files, size=64 * MiB)
    store = tmp_path / "store"
    rpfs("init", store=store)
    first = json.loads(rpfs("backup", "vm", f"--disk=d={image}", "--json", store=store).stdout)
    size_before = (store / "data.mdb").stat().st_size
    with mounted_rw(image, tmp_path / "rw") as mnt:
        (mnt / "file000.bin").write_bytes(os.urandom(300 * 1024))
        (mnt / "new.txt").write_bytes(b"a new file\n" * 100)
    second = json.loads(rpfs("backup", "vm", f"--disk=d={image}", "--json", store=store).stdout)
    # Two files changed: their data blocks plus the metadata blocks (inode table, bitmaps, journal).
    assert second["new_bytes"] <= 8 * MiB, second
    assert second["new_bytes"] < first["new_bytes"] / 2
    growth = (store / "data.mdb").stat().st_size - size_before
    assert growth <= 8 * MiB, growth
    with mounted(store, tmp_path / "rp") as rp:
        assert (rp / "vm" / "latest" / "d.img").read_bytes() == image.read_bytes()


def test_block_device_disk(tmp_path, no_leaks):
    """A disk that is a block device (here a loop device over an odd-sized image) backs up exactly."""
    image = make_odd_size_image(tmp_path / "dev.img")
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        store = tmp_path / "store"
        rpfs("init", store=store)
        summary = json.loads(rpfs("backup", "vm", f"--disk=d={loop}", "--json", store=store).stdout)
        device_size = int(subprocess.run(["blockdev", "--getsize64", loop], capture_output=True,
                                         text=True, check=True).stdout)
        assert summary["bytes_read"] == device_size
        with open(loop, "rb") as device:
            expected = device.read()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    with mounted(store, tmp_path / "rp") as rp:
        assert (rp / "vm" / "latest" / "d.img").read_bytes() == expected


def test_detach_leaves_other_mounts_alone(tmp_path, no_leaks):
    """detach undoes only what attach made, even when other mounts sit below the same folder."""
    files = random_files(50, count=4)
    image = make_whole_disk_ext4(tmp_path / "disk.img", files)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={image}", store=store)
    work = tmp_path / "work"
    with mounted(store, work / "rp") as rp:
        rpfs("attach", str(rp / "vm" / "latest" / "d.img"), str(work / "restore"))
        done = json.loads(rpfs("detach", str(work), "--json").stdout)
        assert done["unmounted"] == [str(work / "restore" / "disk")]
        assert os.listdir(rp) == ["vm"]   # the store mount below `work` is untouched


def test_whole_vm_attach_from_the_cli(tmp_path, no_leaks):
    files = {"p1": random_files(70, count=5), "p2": random_files(71, count=5), "data": random_files(72, count=5)}
    os_image = make_gpt_image(tmp_path / "os.img", files["p1"], files["p2"])
    data_image = make_whole_disk_ext4(tmp_path / "data.img", files["data"])
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=os={os_image}", f"--disk=data={data_image}", store=store)
    dest = tmp_path / "vm-restore"
    attached = json.loads(rpfs("attach", "vm", str(dest), "--json", store=store).stdout)
    try:
        assert [d["disk"] for d in attached["disks"]] == ["os", "data"]
        assert tree_digests(dest / "os" / "p1") == expected_digests(files["p1"])
        assert tree_digests(dest / "os" / "p2") == expected_digests(files["p2"])
        assert tree_digests(dest / "data" / "disk") == expected_digests(files["data"])
    finally:
        rpfs("detach", str(dest))
    assert list(dest.iterdir()) == []


def test_a_killed_whole_vm_attach_is_undone_by_detach_or_by_the_same_attach(tmp_path, no_leaks):
    """kill -9 right after its private store mount started leaves that mount and its record, nothing
    attached below DEST: detach removes them, and so does the same attach run again (issue 9, defect 8)."""
    from rpfs.host import run_dir
    from rpfs.serve.store_mount import start_store_daemon
    image = make_whole_disk_ext4(tmp_path / "data.img", random_files(73, count=3))
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=data={image}", store=store)
    dest = tmp_path / "vm-restore"
    registry, store_mount = run_dir.attach_files(dest)

    def killed_attach():
        run_dir.write_file(registry, json.dumps({"dest": str(dest), "store_mount": str(store_mount)}))
        with open_store(store, readonly=True) as opened:
            start_store_daemon(opened, run_dir.make_folder(store_mount), 64 << 20)
        assert is_mounted(store_mount)

    killed_attach()
    rpfs("detach", str(dest))
    assert not is_mounted(store_mount) and not registry.exists()
    killed_attach()
    rpfs("attach", "vm", str(dest), store=store)
    try:
        assert (dest / "data" / "disk").is_dir()
    finally:
        rpfs("detach", str(dest))
    assert not is_mounted(store_mount) and not registry.exists()
