"""Partition-table parsing (kernel-free) and read-only attach/detach of real images (loop + mount)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool, skip_or_fail_in_ci
from diskimages import (
    copy_live,
    have_mkfs,
    leftover_kernel_state,
    make_blank_partitioned_image,
    make_dirty_image,
    make_empty_image,
    make_gpt_image,
    make_mbr_image,
    make_mixed_image,
    make_odd_size_image,
    make_partitioned_image,
    make_sparse_image,
    make_whole_disk_ext4,
    mkfs_xfs,
    mounted_rw,
    needs_log_recovery,
    random_files,
    read_tree,
)

import rpfs.attach.filesystems as attach_mod
from rpfs.attach.filesystems import AttachedFilesystem, attach, detach
from rpfs.attach.partitions import Partition, read_partitions
from rpfs.errors import RpfsError
from rpfs.host import mountinfo

MiB = 1 << 20


@pytest.fixture
def needs_sfdisk_fixture():
    require_tool("sfdisk")


needs_sfdisk = pytest.mark.usefixtures("needs_sfdisk_fixture")


# ---------------------------------------------------------------- partition tables, no kernel needed

def _sfdisk(image: Path, script: str, *args: str) -> None:
    subprocess.run(["sfdisk", "--quiet", *args, str(image)], input=script, text=True, check=True,
                   capture_output=True)


def _sfdisk_json(image: Path, *args: str) -> list[Partition]:
    """What sfdisk itself reads, as Partitions (extended containers dropped), to cross-check our parser."""
    out = subprocess.run(["sfdisk", "--json", *args, str(image)], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    parts = []
    for p in table["partitions"]:
        number = int(p["node"].removeprefix(str(image)))
        if table["label"] == "dos" and p["type"].lower() in ("5", "f", "85"):
            continue
        ptype = p["type"].lower() if table["label"] == "gpt" else f"0x{int(p['type'], 16):02x}"
        parts.append(Partition(number, p["start"] * sector, p["size"] * sector, ptype))
    return parts


def _blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@needs_sfdisk
def test_gpt_numbers_follow_table_slots(tmp_path):
    image = _blank(tmp_path / "gpt.img", 64 * MiB)
    _sfdisk(image, "label: gpt\n1 : start=2048, size=8192, type=linux\n"
                   "3 : start=20480, size=16384, type=swap\n")
    parts = read_partitions(image)
    assert [p.number for p in parts] == [1, 3]
    assert parts[0] == Partition(1, 1 * MiB, 4 * MiB, "0fc63daf-8483-4772-8e79-3d69d8477de4")
    assert parts == _sfdisk_json(image)


@needs_sfdisk
def test_mbr_logical_partitions_skip_the_extended_container(tmp_path):
    image = _blank(tmp_path / "mbr.img", 64 * MiB)
    _sfdisk(image, "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=40960, type=5\n"
                   "start=12288, size=8192, type=83\nstart=22528, size=8192, type=82\n")
    parts = read_partitions(image)
    assert [(p.number, p.type) for p in parts] == [(1, "0x83"), (5, "0x83"), (6, "0x82")]
    assert parts[1].start == 12288 * 512 and parts[2].size == 8192 * 512
    assert parts == _sfdisk_json(image)


@needs_sfdisk
def test_gpt_with_4k_sectors(tmp_path):
    """sfdisk 2.38 has no --sector-size; fdisk -b writes a 4Kn GPT into a file."""
    image = _blank(tmp_path / "4k.img", 64 * MiB)
    subprocess.run(["fdisk", "-b", "4096", str(image)], input="g\nn\n1\n256\n+8M\nw\n", text=True,
                   check=True, capture_output=True)
    assert read_partitions(image) == [Partition(1, 1 * MiB, 8 * MiB, "0fc63daf-8483-4772-8e79-3d69d8477de4")]


@needs_sfdisk
def test_gpt_falls_back_to_backup_header(tmp_path):
    image = _blank(tmp_path / "gpt.img", 32 * MiB)
    _sfdisk(image, "label: gpt\nstart=2048, size=8192, type=linux\n")
    expected = read_partitions(image)
    with open(image, "r+b") as f:
        f.seek(512)
        f.write(bytes(512))  # primary header gone
    assert read_partitions(image) == expected
    with open(image, "r+b") as f:
        f.seek(32 * MiB - 512)
        f.write(bytes(512))  # backup gone too
    with pytest.raises(RpfsError, match="protective MBR but no valid GPT"):
        read_partitions(image)


def test_images_without_a_table(tmp_path):
    assert read_partitions(make_empty_image(tmp_path / "empty.img")) == []
    assert read_partitions(make_odd_size_image(tmp_path / "odd.img")) == []
    assert read_partitions(make_sparse_image(tmp_path / "sparse.img")) == []
    if shutil.which("mkfs.ext4"):
        assert read_partitions(make_whole_disk_ext4(tmp_path / "ext4.img", {"a": b"a"})) == []
    if shutil.which("mkfs.vfat"):  # a FAT boot sector carries 55AA but is no MBR
        vfat = _blank(tmp_path / "vfat.img", 33 * MiB)
        subprocess.run(["mkfs.vfat", str(vfat)], check=True, capture_output=True)
        assert read_partitions(vfat) == []


def _mbr_entry(ptype: int, start: int, count: int) -> bytes:
    return bytes([0, 0, 0, 0, ptype, 0, 0, 0]) + struct.pack("<II", start, count)


def test_looping_ebr_chain_terminates(tmp_path):
    """A hand-made extended partition whose EBR links back to itself must not hang the parser."""
    disk = bytearray(4 * MiB)
    disk[446:462] = _mbr_entry(0x05, 2048, 4096)
    disk[510:512] = b"\x55\xaa"
    ebr = 2048 * 512
    disk[ebr + 446: ebr + 462] = _mbr_entry(0x83, 2048, 1024)
    disk[ebr + 462: ebr + 478] = _mbr_entry(0x05, 0, 4096)  # next EBR == this EBR
    disk[ebr + 510: ebr + 512] = b"\x55\xaa"
    image = tmp_path / "loop.img"
    image.write_bytes(bytes(disk))
    assert read_partitions(image) == [Partition(5, 4096 * 512, 1024 * 512, "0x83")]


def test_unreadable_image_is_an_rpfs_error(tmp_path):
    with pytest.raises(RpfsError, match="cannot read partition table"):
        read_partitions(tmp_path / "missing.img")


# ---------------------------------------------------------------- attach argument checks, no kernel needed

def test_attach_rejects_missing_image_and_busy_dest(tmp_path):
    with pytest.raises(RpfsError, match="does not exist"):
        attach(tmp_path / "missing.img", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    image = make_empty_image(tmp_path / "empty.img")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RpfsError, match="not empty"):
        attach(image, tmp_path / "full")
    with pytest.raises(RpfsError, match="not a directory"):
        attach(image, image)
    with pytest.raises(RpfsError, match="is a directory"):
        attach(tmp_path / "full", tmp_path / "dest")


def test_detach_with_nothing_attached(tmp_path):
    with pytest.raises(RpfsError, match="nothing attached at"):
        detach(tmp_path)


def test_mountinfo_unescape():
    assert mountinfo._unescape(r"/tmp/my\040dest/a\134b\011c") == "/tmp/my dest/a\\b\tc"


# ---------------------------------------------------------------- real kernel: loop devices and mounts

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mount_entry(mountpoint: Path) -> tuple[str, str, str]:
    """(source, per-mount options, super options) of a mountpoint from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if mountinfo._unescape(fields[4]) == str(mountpoint):
            sep = fields.index("-")
            return fields[sep + 2], fields[5], fields[sep + 3]
    raise AssertionError(f"{mountpoint} not mounted")


def _assert_read_only_mount(fs: AttachedFilesystem) -> None:
    mountpoint = Path(fs.mountpoint)
    source, options, _ = _mount_entry(mountpoint)
    assert options.split(",")[0] == "ro"
    loop = Path(source).name
    assert loop.startswith("loop")
    assert Path(f"/sys/block/{loop}/ro").read_text().strip() == "1", "loop device is writable"
    assert Path(f"/sys/block/{loop}/loop/autoclear").read_text().strip() == "1"
    assert int(Path(f"/sys/block/{loop}/loop/offset").read_text()) == fs.offset
    with pytest.raises(OSError):
        (mountpoint / "new-file").write_bytes(b"x")


@pytest.mark.timeout(120)
def test_attach_gpt_ext4_and_xfs(area):
    files1, files2 = random_files(1), random_files(2)
    image = make_gpt_image(area / "gpt.img", files1, files2)
    before = _sha256(image)
    dest = area / "mnt"
    attached = attach(image, dest)
    try:
        assert [(a.name, a.partition, a.fstype, a.status) for a in attached] == [
            ("p1", 1, "ext4", "mounted"), ("p2", 2, "xfs", "mounted")]
        assert attached[0].mountpoint == str(dest / "p1")
        json.dumps([dataclasses.asdict(a) for a in attached])
        for fs in attached:
            _assert_read_only_mount(fs)
        assert read_tree(dest / "p1") == files1
        assert read_tree(dest / "p2") == files2
        assert "norecovery" in _mount_entry(dest / "p1")[2]
        assert {"norecovery", "nouuid"} <= set(_mount_entry(dest / "p2")[2].split(","))
    finally:
        detach(dest)
    assert _sha256(image) == before


@pytest.mark.timeout(120)
def test_attach_mbr_with_logical_partition(area):
    files = random_files(3)
    image = make_mbr_image(area / "mbr.img", files, {"deep/logical.txt": b"logical"})
    dest = area / "mnt"
    attached = attach(image, dest)
    try:
        assert [(a.name, a.status) for a in attached] == [("p1", "mounted"), ("p5", "mounted")]
        assert read_tree(dest / "p1") == files
        assert (dest / "p5" / "deep" / "logical.txt").read_bytes() == b"logical"
    finally:
        detach(dest)


@pytest.mark.timeout(120)
def test_attach_whole_disk_filesystem(area):
    files = random_files(4)
    image = make_whole_disk_ext4(area / "disk.img", files)
    dest = area / "new" / "mnt"  # missing parents are created
    attached = attach(image, dest)
    try:
        assert [(a.name, a.partition, a.fstype, a.offset) for a in attached] == [("disk", None, "ext4", 0)]
        assert read_tree(dest / "disk") == files
        # direct I/O (no second copy in the loop device's cache) and a read-ahead of one store block
        source = next(m.source for m in mountinfo.read_mountinfo() if m.mountpoint == str(dest / "disk"))
        loop = os.path.basename(source)
        assert Path(f"/sys/block/{loop}/loop/dio").read_text().strip() == "1"
        assert Path(f"/sys/block/{loop}/queue/read_ahead_kb").read_text().strip() == "1024"
    finally:
        detach(dest)


@pytest.mark.timeout(120)
def test_unsupported_partitions_are_reported_and_skipped(area):
    files = random_files(5, count=3)
    image = make_mixed_image(area / "mixed.img", files)
    dest = area / "mnt"
    attached = attach(image, dest)
    try:
        status = {a.name: a.status for a in attached}
        assert status["p1"] == "unsupported filesystem swap"
        assert status["p2"] == "mounted"
        assert status["p3"] == ("unsupported filesystem vfat" if have_mkfs("vfat") else "no filesystem detected")
        assert status["p4"] == "no filesystem detected"
        assert sorted(os.listdir(dest)) == ["p2"]
        assert read_tree(dest / "p2") == files
    finally:
        detach(dest)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("builder", [make_blank_partitioned_image, make_sparse_image, make_empty_image,
                                     make_odd_size_image])
def test_no_filesystem_leaves_nothing_behind(area, builder):
    image = builder(area / "nofs.img")
    dest = area / "a" / "mnt"
    with pytest.raises(RpfsError, match="no filesystem found in"):
        attach(image, dest)
    assert not (area / "a").exists()
    existing = area / "existing"
    existing.mkdir()
    with pytest.raises(RpfsError, match="no filesystem found in"):
        attach(image, existing)
    assert existing.is_dir() and not any(existing.iterdir())


@pytest.mark.timeout(120)
def test_detach_undoes_everything(area):
    image = make_gpt_image(area / "gpt.img", random_files(6, count=2), random_files(7, count=2))
    dest = area / "my dest"  # a space: mountinfo shows it as \040
    before = leftover_kernel_state(area)
    attach(image, dest)
    assert len(leftover_kernel_state(area)[0]) == 2
    unmounted = detach(dest)
    assert sorted(unmounted) == [str(dest / "p1"), str(dest / "p2")]
    assert leftover_kernel_state(area) == before == ([], [])
    assert dest.is_dir() and not any(dest.iterdir())
    with pytest.raises(RpfsError, match="nothing attached at"):
        detach(dest)


@pytest.mark.timeout(120)
def test_dirty_ext4_journal_is_not_replayed(area):
    files = random_files(8, count=4)
    image = make_dirty_image(area / "dirty.img", files)
    assert needs_log_recovery(image, "ext4"), "fixture should need journal recovery"
    before = _sha256(image)
    dest = area / "mnt"
    attached = attach(image, dest)
    try:
        assert attached[0].status == "mounted"
        os.listdir(dest / "disk")
    finally:
        detach(dest)
    assert _sha256(image) == before


@pytest.mark.timeout(120)
def test_dirty_xfs_attaches_while_its_live_twin_is_mounted(area):
    """Same UUID mounted twice and a dirty log: needs both nouuid and norecovery."""
    live = area / "live.img"
    with open(live, "wb") as f:
        f.truncate(300 * MiB)
    mkfs_xfs(live, {})
    dest = area / "mnt"
    with mounted_rw(live, area / "live") as mnt:
        (mnt / "written-while-live").write_bytes(b"x" * 100_000)
        copy = copy_live(live, mnt, area / "copy.img")
        attached = attach(copy, dest)
        try:
            assert [(a.fstype, a.status) for a in attached] == [("xfs", "mounted")]
        finally:
            detach(dest)


@pytest.mark.timeout(120)
def test_busy_dest_is_refused(area):
    image = make_whole_disk_ext4(area / "disk.img", {"a.txt": b"a"})
    other = make_whole_disk_ext4(area / "other.img", {"b.txt": b"b"})
    dest = area / "mnt"
    attach(image, dest)
    try:
        with pytest.raises(RpfsError, match="already has something attached"):
            attach(other, dest)
        with pytest.raises(RpfsError, match="is a mountpoint"):
            attach(image, dest / "disk")
        (dest / "stray").mkdir()
        with pytest.raises(RpfsError, match="not empty"):
            attach(image, dest)
        assert (dest / "disk" / "a.txt").read_bytes() == b"a"  # first attach untouched
    finally:
        detach(dest)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("left", ["folders made", "p1 mounted, p2's folder made", "everything attached"])
def test_attach_run_again_completes_what_a_killed_one_left(area, left):
    """kill -9 of `rpfs attach` leaves folders and mounts (the mount(8) it ran finishes on its own): the
    same attach run again completes them and answers as one run would (found by tools/chaos)."""
    files1, files2 = random_files(11, count=2), random_files(12, count=2)
    image = make_gpt_image(area / "gpt.img", files1, files2)
    dest = area / "mnt"
    if left == "folders made":
        (dest / "p1").mkdir(parents=True)
    else:
        attach(image, dest)
    try:
        if left == "p1 mounted, p2's folder made":
            subprocess.run(["umount", str(dest / "p2")], check=True)
        assert [(a.name, a.status, a.mountpoint) for a in attach(image, dest)] == [
            ("p1", "mounted", str(dest / "p1")), ("p2", "mounted", str(dest / "p2"))]
        assert read_tree(dest / "p1") == files1 and read_tree(dest / "p2") == files2
        assert len(leftover_kernel_state(area)[0]) == 2
    finally:
        detach(dest)
    assert leftover_kernel_state(area) == ([], []) and os.listdir(dest) == []


@pytest.mark.timeout(120)
def test_detach_run_again_removes_what_a_killed_one_left(area):
    """A detach killed between an unmount and its rmdir leaves an empty p<N>: run again, it removes it; then
    there is nothing attached."""
    image = make_gpt_image(area / "gpt.img", random_files(13, count=1), random_files(14, count=1))
    dest = area / "mnt"
    attach(image, dest)
    subprocess.run(["umount", str(dest / "p1")], check=True)
    assert detach(dest) == [str(dest / "p2")]
    assert os.listdir(dest) == [] and leftover_kernel_state(area) == ([], [])
    (dest / "p1").mkdir()
    assert detach(dest) == [] and os.listdir(dest) == []
    with pytest.raises(RpfsError, match="nothing attached at"):
        detach(dest)


@pytest.mark.timeout(120)
def test_mount_failure_is_that_partitions_status(area, monkeypatch):
    monkeypatch.setitem(attach_mod.MOUNT_OPTIONS, "xfs", "ro,no-such-option")
    image = make_gpt_image(area / "gpt.img", {"a": b"a"}, {"b": b"b"})
    dest = area / "mnt"
    attached = attach(image, dest)
    try:
        assert attached[0].status == "mounted"
        assert attached[1].status.startswith("mount failed: mount: ")
        assert attached[1].mountpoint is None and not (dest / "p2").exists()
    finally:
        detach(dest)


@pytest.mark.timeout(120)
def test_interrupted_attach_rolls_back(area, monkeypatch):
    image = make_gpt_image(area / "gpt.img", {"a": b"a"}, {"b": b"b"})
    real_probe = attach_mod._probe

    def probe_then_interrupt(image, offset, size):
        if offset > 2 * MiB:  # the second partition
            raise KeyboardInterrupt
        return real_probe(image, offset, size)

    monkeypatch.setattr(attach_mod, "_probe", probe_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        attach(image, area / "mnt")
    assert not (area / "mnt").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fstype", ["btrfs", "squashfs", "erofs"])
def test_optional_filesystems(area, fstype):
    if not have_mkfs(fstype):
        skip_or_fail_in_ci(f"no mkfs for {fstype} (run tools/setup)")
    files = random_files(9, count=4)
    image = make_partitioned_image(area / f"{fstype}.img", [(fstype, files)])
    dest = area / "mnt"
    attached = attach(image, dest)
    try:
        assert [(a.fstype, a.status) for a in attached] == [(fstype, "mounted")]
        assert read_tree(dest / "p1") == files
    finally:
        detach(dest)
