"""Kernel-free tests of the store, the backup pipeline and the image read path."""
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lmdb
import pytest
from cli_helpers import open_store, previous_release, previous_rpfs, rpfs, session_keys, writer_lock_held
from hypothesis import given, settings
from hypothesis import strategies as st

from rpfs.backup.pipeline import backup, parse_disk_specs
from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.serve.image import BlockCache, ImageReader
from rpfs.store import blob
from rpfs.store.formats import upgrade
from rpfs.store.recovery_point import new_point_id
from rpfs.store.store import FORMAT_VERSION, Store

MiB = 1 << 20


def write_image(path: Path, seed: int, size: int) -> Path:
    """Random, compressible, duplicated and zero regions, in 256 KiB pieces."""
    rnd = random.Random(seed)
    piece = 256 << 10
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(piece, left)
            kind = rnd.choice(["random", "text", "zero", "repeat"])
            if kind == "random":
                f.write(rnd.randbytes(n))
            elif kind == "text":
                f.write((b"log line %d ok\n" % rnd.randrange(10**6) * (n // 10 + 1))[:n])
            elif kind == "zero":
                f.seek(n, os.SEEK_CUR)
            else:
                f.write((b"ABCD" * (n // 4 + 1))[:n])
            left -= n
        f.truncate(size)
    return path


def read_all(store: Store, point, disk: str) -> bytes:
    reader = ImageReader(store, BlockCache(8 * MiB), point.vm, point.id, point.disk(disk))
    return reader.read(0, reader.size + 1)


def test_backup_reads_back_identical(opened_store, tmp_path):
    a = write_image(tmp_path / "a.img", 1, 9 * MiB + 12345)
    b = write_image(tmp_path / "b.img", 2, 4 * MiB)
    empty = tmp_path / "empty.img"
    empty.touch()
    point, summary = backup(opened_store, "vm1", [("a", str(a)), ("b", str(b)), ("empty", str(empty))])
    assert point.consistency == "crash"
    assert summary.bytes_read == a.stat().st_size + b.stat().st_size
    for name, path in (("a", a), ("b", b), ("empty", empty)):
        assert read_all(opened_store, point, name) == path.read_bytes()
    assert [p.id for p in opened_store.points("vm1")] == [point.id]


def test_sparse_image_stores_only_data(opened_store, tmp_path):
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
        f.seek(300 * MiB)
        f.write(b"x" * 5000)
    point, summary = backup(opened_store, "vm", [("d", str(sparse))])
    disk = point.disk("d")
    assert disk.blocks == 1024 and disk.zero_blocks == 1023 and disk.new_blocks == 1
    assert summary.zero_bytes == (1 << 30) - MiB
    reader = ImageReader(opened_store, BlockCache(), "vm", point.id, disk)
    assert reader.read(300 * MiB - 10, 5020) == bytes(10) + b"x" * 5000 + bytes(10)


def test_second_backup_stores_only_changed_blocks(opened_store, tmp_path):
    img = write_image(tmp_path / "d.img", 3, 32 * MiB)
    backup(opened_store, "vm", [("d", str(img))])
    before = opened_store.stored_bytes()
    with open(img, "r+b") as f:
        for offset in (1 * MiB + 7, 20 * MiB + 4096):
            f.seek(offset)
            f.write(os.urandom(1000))
    point, summary = backup(opened_store, "vm", [("d", str(img))])
    assert summary.new_bytes == 2 * MiB
    assert point.disk("d").new_blocks == 2
    assert opened_store.stored_bytes() - before < 3 * MiB
    assert read_all(opened_store, point, "d") == img.read_bytes()


def test_a_block_repeated_across_tasks_and_disks_is_stored_once(opened_store, tmp_path):
    """Workers claim each new block id once (pipeline._BackupRun.claim): copies of a block read at the same
    time on other workers, in other tasks and on another disk are counted as deduplicated, and stored once."""
    block = random.Random(5).randbytes(MiB)
    one, two = tmp_path / "one.img", tmp_path / "two.img"
    one.write_bytes(block * 24)
    two.write_bytes(block * 8 + random.Random(6).randbytes(MiB))
    point, summary = backup(opened_store, "vm", [("a", str(one)), ("b", str(two))], workers=4)
    assert summary.new_bytes == 2 * MiB and summary.deduplicated_bytes == 31 * MiB
    assert len(opened_store.block_map(opened_store.map_key("vm", point.id, "a"))) == 24 * 32
    assert read_all(opened_store, point, "a") == one.read_bytes()
    assert read_all(opened_store, point, "b") == two.read_bytes()
    with opened_store.read() as txn:
        assert txn.stat(opened_store.db("blocks"))["entries"] == 2


def test_two_vms_dedup_against_each_other(opened_store, tmp_path):
    img = write_image(tmp_path / "base.img", 4, 16 * MiB)
    backup(opened_store, "web01", [("os", str(img))])
    _, summary = backup(opened_store, "web02", [("os", str(img))])
    assert summary.new_bytes == 0 and summary.stored_bytes == 0
    assert summary.deduplicated_bytes + summary.zero_bytes == img.stat().st_size


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 9 * MiB + 20000), length=st.integers(0, 3 * MiB))
def test_random_reads_match_source(offset, length, tmp_path_factory, _random_read_setup):
    store, point, data = _random_read_setup
    reader = ImageReader(store, BlockCache(4 * MiB), point.vm, point.id, point.disk("a"))
    assert reader.read(offset, length) == data[offset:offset + length]


@pytest.fixture(scope="module")
def _random_read_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rr")
    img = write_image(tmp / "a.img", 5, 9 * MiB + 777)
    with Store.init(tmp / "store", block_size=256 << 10) as store:
        point, _ = backup(store, "vm", [("a", str(img))])
        yield store, point, img.read_bytes()


def corrupt_one_block(store: Store, point, disk: str) -> bytes:
    """Flip a byte in the payload of the first stored block of a disk; return its digest."""
    digest = next(store.block_digest(store.map_key(point.vm, point.id, disk), i)
                  for i in range(point.disk(disk).blocks)
                  if any(store.block_digest(store.map_key(point.vm, point.id, disk), i)))
    stored = bytearray(store.get_blob(digest))
    stored[-1] ^= 0xFF
    store.write(lambda txn: txn.put(digest, bytes(stored), db=store.db("blocks")))
    return digest


def test_corrupt_block_is_an_error_not_wrong_data(opened_store, tmp_path):
    img = write_image(tmp_path / "d.img", 6, 4 * MiB)
    point, _ = backup(opened_store, "vm", [("d", str(img))])
    digest = corrupt_one_block(opened_store, point, "d")
    with pytest.raises(CorruptBlockError):
        read_all(opened_store, point, "d")
    with pytest.raises(CorruptBlockError):
        blob.check_crc(opened_store.get_blob(digest))


def test_interrupted_backup_leaves_no_recovery_point(opened_store, tmp_path, monkeypatch):
    img = write_image(tmp_path / "d.img", 7, 8 * MiB)
    import rpfs.backup.source as source
    real_read = source.DiskSource.read_block
    calls = {"n": 0}

    def failing_read(self, index, block_size, buffers, codec):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_read(self, index, block_size, buffers, codec)

    monkeypatch.setattr(source.DiskSource, "read_block", failing_read)
    with pytest.raises(KeyboardInterrupt):
        backup(opened_store, "vm", [("d", str(img))])
    assert opened_store.points() == []
    monkeypatch.setattr(source.DiskSource, "read_block", real_read)
    point, _ = backup(opened_store, "vm", [("d", str(img))])
    assert read_all(opened_store, point, "d") == img.read_bytes()


def test_map_grows_by_itself(tmp_path, monkeypatch):
    import rpfs.store.store as store_mod
    monkeypatch.setattr(store_mod, "INITIAL_MAP_SIZE", 2 * MiB)
    img = tmp_path / "rand.img"
    img.write_bytes(os.urandom(12 * MiB))
    with Store.init(tmp_path / "s") as store:
        point, _ = backup(store, "vm", [("d", str(img))])
        assert store.map_size() > 2 * MiB
        assert read_all(store, point, "d") == img.read_bytes()


def test_store_of_another_format_version_is_refused(tmp_path):
    with Store.init(tmp_path / "s"):
        pass
    env = lmdb.open(str(tmp_path / "s"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(RpfsError, match="format version 99"):
        open_store(tmp_path / "s")


def test_point_ids_are_never_given_twice():
    """Not even after prune: a mount (and the kernel's cache) knows a recovery point by its id."""
    when = datetime(2026, 11, 25, 17, 0, 3, tzinfo=timezone.utc)
    assert new_point_id(when, set()) == "2026-11-25T170003Z"
    assert new_point_id(when, {"2026-11-25T170003Z"}) == "2026-11-25T170003Z-2"
    assert new_point_id(when, {"2026-11-25T170003Z-9"}) == "2026-11-25T170003Z-10"   # -2 .. -9 pruned
    assert new_point_id(when - timedelta(seconds=5), {"2026-11-25T170003Z"}) == "2026-11-25T170003Z-2"
    assert new_point_id(when + timedelta(seconds=1), {"2026-11-25T170003Z-4"}) == "2026-11-25T170004Z"


def test_a_pruned_points_id_stays_used(opened_store, tmp_path):
    first, _ = backup(opened_store, "vm", [("d", str(write_image(tmp_path / "d.img", 1, 2 * MiB)))])
    opened_store.delete_point(first)
    assert opened_store.points("vm") == [] and opened_store.last_point_ids("vm") == {first.id}
    second, _ = backup(opened_store, "vm", [("d", str(tmp_path / "d.img"))])
    assert second.id > first.id


def test_second_writer_is_refused(opened_store):
    with writer_lock_held(opened_store.path, "backup of vm1"):
        with pytest.raises(RpfsError, match="busy.*backup of vm1"):
            with opened_store.writer_lock("backup of vm2"):
                pass


@pytest.mark.parametrize("specs, message", [
    ([], "at least one --disk"),
    (["os"], "NAME=PATH"),
    (["os=/a", "os=/b"], "given twice"),
    (["bad/name=/a"], "invalid disk name"),
])
def test_bad_disk_specs(specs, message):
    with pytest.raises(RpfsError, match=message):
        parse_disk_specs(specs)


def test_unreadable_or_missing_disk(opened_store, tmp_path):
    with pytest.raises(RpfsError, match="does not exist"):
        backup(opened_store, "vm", [("d", str(tmp_path / "nope.img"))])
    with pytest.raises(RpfsError, match="not an image file"):
        backup(opened_store, "vm", [("d", str(tmp_path))])
    assert opened_store.points() == []


def test_unknown_vm_and_point(opened_store, tmp_path):
    img = write_image(tmp_path / "d.img", 8, MiB)
    point, _ = backup(opened_store, "vm", [("d", str(img))])
    with pytest.raises(RpfsError, match="unknown VM"):
        opened_store.point("nope")
    with pytest.raises(RpfsError, match="no recovery point"):
        opened_store.point("vm", "2000-01-01T000000Z")
    assert opened_store.point("vm", "latest").id == point.id


READER = """
import sys
import rpfs.store.store as store_mod
store_mod.INITIAL_MAP_SIZE = 2 << 20
from rpfs.serve.image import BlockCache, ImageReader
from rpfs.store.store import Store
store = Store.open(sys.argv[1], readonly=True)
print(store.map_size(), flush=True)
sys.stdin.readline()                      # the writer grows the map meanwhile
point = store.point("vm")
data = ImageReader(store, BlockCache(), "vm", point.id, point.disk("d")).read(0, 1 << 30)
sys.stdout.buffer.write(data)
"""


def test_reader_in_another_process_adopts_a_grown_map(tmp_path, monkeypatch):
    """The mount daemon keeps its environment open while backups grow the map."""
    import rpfs.store.store as store_mod
    monkeypatch.setattr(store_mod, "INITIAL_MAP_SIZE", 2 * MiB)
    with Store.init(tmp_path / "s"):
        pass
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "s")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert int(reader.stdout.readline()) == 2 * MiB
        img = tmp_path / "rand.img"
        img.write_bytes(os.urandom(12 * MiB))
        with open_store(tmp_path / "s") as store:
            backup(store, "vm", [("d", str(img))])
            assert store.map_size() > 2 * MiB
        out, _ = reader.communicate(b"go\n", timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0
    assert out == img.read_bytes()


def test_a_store_opened_while_another_process_grows_the_map(tmp_path):
    """A prune or gc starting while a backup doubles the map opens the store all the same (found by
    tools/load: 'cannot open store: MDB_MAP_RESIZED')."""
    import rpfs.store.store as store_mod
    path = tmp_path / "s"
    rpfs("init", store=path)
    env = lmdb.open(str(path), max_dbs=len(store_mod.DB_NAMES), subdir=True, create=False,
                    map_size=2 * MiB)                           # Store.open's first step, with a small map
    img = tmp_path / "rand.img"
    img.write_bytes(os.urandom(4 * MiB))
    rpfs("backup", "vm", f"--disk=d={img}", store=path)          # writes with a bigger map meanwhile
    with store_mod.Store(path, env, readonly=False, keys=session_keys()) as store:    # Store.open's second step
        assert read_all(store, store.point("vm"), "d") == img.read_bytes()


def test_disk_that_grows_and_shrinks(opened_store, tmp_path):
    img = write_image(tmp_path / "d.img", 9, 3 * MiB + 10)
    sizes, points = [3 * MiB + 10, 5 * MiB + 77, 2 * MiB - 1], []
    for size in sizes:
        with open(img, "r+b") as f:
            f.truncate(size)
            f.seek(size - 1)
            f.write(b"\x01")
        point, _ = backup(opened_store, "vm", [("d", str(img))])
        points.append((point, img.read_bytes()))
    for point, data in points:
        assert point.disk("d").size == len(data)
        assert read_all(opened_store, point, "d") == data


def test_version_1_store_is_read_and_then_upgraded(tmp_path):
    """The previous release makes a version 2 store, turned into what version 1 wrote; it is read as it is,
    then upgraded to version 3: the three identical maps become one shared piece, counted three times."""
    a = write_image(tmp_path / "a.img", 10, 4 * MiB)
    old_rpfs = previous_release(tmp_path)
    previous_rpfs(old_rpfs, tmp_path / "s", "init")
    previous_rpfs(old_rpfs, tmp_path / "s", "backup", "vm1", f"--disk=d={a}")
    previous_rpfs(old_rpfs, tmp_path / "s", "backup", "vm2", f"--disk=d={a}", f"--disk=e={a}")
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)   # turn it into what version 1 wrote
    with env.begin(write=True) as txn:
        for name in (b"refs", b"policies", b"protected", b"jobs"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        txn.put(b"format_version", b"1", db=env.open_db(b"meta", txn=txn))
    env.close()
    with open_store(tmp_path / "s", readonly=True) as old:
        assert old.format_version == 1 and [p.vm for p in old.points()] == ["vm1", "vm2"]
        assert read_all(old, old.point("vm2"), "e") == a.read_bytes()
        with pytest.raises(RpfsError, match="format version 1"):
            old.records("jobs") or old.get_record("jobs", "x")
    with open_store(tmp_path / "s") as upgraded:
        assert upgraded.format_version == FORMAT_VERSION
        blocks, pieces = upgraded.ref_counts()
        assert len(pieces) == 1 and set(pieces.values()) == {3}      # one piece, named by three maps
        assert blocks and set(blocks.values()) == {1}                 # its blocks, named by one piece
        assert read_all(upgraded, upgraded.point("vm2"), "e") == a.read_bytes()
        assert upgraded.recount() == (blocks, pieces, [])
        upgrade(upgraded, 1)   # what a second command that saw version 1 too does: nothing, it is done
        assert upgraded.ref_counts() == (blocks, pieces) and upgraded.recount() == (blocks, pieces, [])


def test_a_backup_of_an_unchanged_disk_adds_an_index_not_a_map(tmp_path):
    """Block maps are kept in shared pieces: the second backup of an unchanged 64 GiB disk stores no piece,
    only its index (under 64 KiB per TiB of disk), and counts its pieces once more, not its blocks."""
    disk = tmp_path / "big.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 30)
        for at in (0, 5 << 30, 40 << 30):
            f.seek(at)
            f.write(os.urandom(3 * MiB))
    with Store.init(tmp_path / "s") as store:
        first, _ = backup(store, "vm", [("d", str(disk))])
        blocks_before, pieces_before = store.ref_counts()
        second, _ = backup(store, "vm", [("d", str(disk))])
        blocks_after, pieces_after = store.ref_counts()
        assert blocks_after == blocks_before and pieces_after.keys() == pieces_before.keys()
        assert all(pieces_after[p] == pieces_before[p] + 1 for p in pieces_before)
        with store.read() as txn:
            index = txn.get(store.map_key("vm", second.id, "d"), db=store.db("maps"))
            assert len(index) <= 64 * 1024 * 64 / 1024          # 64 KiB per TiB, for 64 GiB
        for point in (first, second):
            reader = ImageReader(store, BlockCache(8 * MiB), "vm", point.id, point.disk("d"))
            assert reader.read(5 << 30, 3 * MiB) == _read_at(disk, 5 << 30, 3 * MiB)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
