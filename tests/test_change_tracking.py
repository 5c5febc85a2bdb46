"""Change tracking on a real XFS with reflinks: blocks whose extents the kept snapshot shares are not read,
and the recovery point is byte for byte what a backup that reads everything makes (through the mount)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import mounted, open_store, rpfs
from test_consistency import loop_mounted, run

from rpfs.backup import extents

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("kernel")]
MiB = 1 << 20
BLOCK = 256 << 10


@pytest.fixture
def xfs(tmp_path):
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 * MiB)
    run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    with loop_mounted(image, tmp_path / "xfs") as mountpoint:
        yield mountpoint


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def backup(store: Path, disk: Path, keep: bool) -> dict:
    """VM "vm" keeps its snapshot; VM "ref" (in the other store) must not: a backup deletes the snapshots of
    its VM that its store does not record, so the two are told apart by name."""
    vm = "vm" if keep else "ref"
    args = ["backup", vm, f"--disk=d={disk}", "--json"] + (["--keep-snapshot-days", "1"] if keep else [])
    return json.loads(rpfs(*args, store=store).stdout)


def image_through_mount(store: Path, mountpoint: Path, vm: str, point_id: str) -> bytes:
    with mounted(store, mountpoint):
        return (mountpoint / vm / point_id / "d.img").read_bytes()


def test_unchanged_extents_are_not_read_and_the_point_is_the_same_either_way(xfs, tmp_path):
    disk = xfs / "vm" / "d.img"
    disk.parent.mkdir()
    data = bytearray(os.urandom(24 * MiB))
    data[4 * MiB:6 * MiB] = bytes(2 * MiB)   # zeros the backup records as holes
    disk.write_bytes(bytes(data))
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(8 * MiB), "--length", str(MiB), str(disk)], check=True)
    tracked, full = tmp_path / "tracked", tmp_path / "full"   # change tracking / a store that reads everything
    for store in (tracked, full):
        rpfs("init", "--block-size", "256K", store=store)
    first = backup(tracked, disk, keep=True)
    assert first["recovery_point"]["disks"][0]["change_tracking"] == "checksum"   # nothing kept before it

    changes = [
        ("in place", lambda: write_at(disk, 10 * MiB + 1000, os.urandom(5000))),
        ("appended", lambda: open(disk, "ab").write(os.urandom(MiB + 12345))),
        ("punched", lambda: subprocess.run(["fallocate", "--punch-hole", "--offset", str(2 * MiB), "--length",
                                            str(3 * BLOCK), str(disk)], check=True)),
        ("truncated", lambda: os.truncate(disk, 20 * MiB + 777)),
        ("nothing", lambda: None),
    ]
    for what, change in changes:
        change()
        got = backup(tracked, disk, keep=True)
        reference = backup(full, disk, keep=False)
        record = got["recovery_point"]["disks"][0]
        size = disk.stat().st_size
        assert record["change_tracking"] == "extents", what
        assert record["read_bytes"] <= 3 * MiB, (what, record["read_bytes"])   # only what changed (and ends)
        assert got["unchanged_bytes"] > size // 2, what
        assert reference["recovery_point"]["disks"][0]["read_bytes"] > 16 * MiB, what
        want = disk.read_bytes()
        assert image_through_mount(tracked, tmp_path / "m1", "vm", got["recovery_point"]["id"]) == want, what
        assert image_through_mount(full, tmp_path / "m2", "ref", reference["recovery_point"]["id"]) == want, what
    with open_store(tracked, readonly=True) as store:
        assert [d.change_tracking for p in store.points("vm") for d in p.disks] == ["checksum"] + ["extents"] * 5


def test_extents_that_filesystem_cannot_vouch_for_are_read(tmp_path):
    """Two files on a filesystem without shared extents (or no FIEMAP at all) share no block."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(2 * MiB))
    b.write_bytes(a.read_bytes())
    fd = os.open(b, os.O_RDONLY)
    try:
        assert not any(extents.unchanged_blocks(a, fd, 2 * MiB, 2 * MiB, BLOCK))   # same bytes, other extents
        assert extents.unchanged_blocks(b, fd, 2 * MiB, 2 * MiB, BLOCK) is None   # the same file: no answer
    finally:
        os.close(fd)
