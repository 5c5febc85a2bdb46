"""Blob sizes in records of their own (format 5): what backup, gc and usage count is looked up without
reading the blobs (py-lmdb reads every page of a value it returns), and stores of format 4 are upgraded."""
from __future__ import annotations

import json

import pytest
from cli_helpers import FORMAT_4_RELEASE, open_store, previous_release, previous_rpfs, rpfs
from test_backup import read_all, write_image

from rpfs.policy.policies import Retention
from rpfs.policy.prune import prune
from rpfs.store.blob import read_header
from rpfs.store.store import SIZES

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


def blobs(store) -> dict[bytes, tuple[int, int]]:
    """(stored, raw) length of every blob, measured from the blobs themselves."""
    with store.read() as txn:
        return {bytes(k): (len(v), read_header(v).raw_length) for k, v in txn.cursor(db=store.db("blocks"))}


def size_records(store) -> dict[bytes, tuple[int, int]]:
    with store.read() as txn:
        return {bytes(k): SIZES.unpack(v) for k, v in txn.cursor(db=store.db("sizes"))}


def distinct_stored(store, point, measured) -> int:
    block_map = store.block_map(store.map_key(point.vm, point.id, point.disks[0].name))
    digests = {block_map[i:i + 32] for i in range(0, len(block_map), 32)}
    return sum(measured[d][0] for d in digests if d in measured)


def test_every_blob_has_its_size_recorded_and_gc_removes_it(tmp_path):
    store = tmp_path / "s"
    rpfs("init", store=store)
    for seed in (1, 2, 3):
        rpfs("backup", "vm", f"--disk=d={write_image(tmp_path / 'd.img', seed, 4 * MiB)}", store=store)
    with open_store(store) as s:
        measured = blobs(s)
        assert size_records(s) == measured
        assert s.meta["blob_sizes"] == "all" and all(s.has_block(d) for d in measured)
        for point in s.points("vm"):
            assert point.disks[0].stored_bytes == distinct_stored(s, point, measured)
    usage = json.loads(rpfs("usage", "--json", store=store).stdout)
    assert usage["stored_bytes"] == sum(stored for stored, _ in measured.values())
    assert usage["distinct_bytes"] == sum(raw for _, raw in measured.values())
    with open_store(store) as s:
        prune(s, {"vm": Retention(keep_last=1)})
    freed = json.loads(rpfs("gc", "--json", store=store).stdout)["freed_bytes"]
    with open_store(store) as s:
        left = blobs(s)
        assert size_records(s) == left
    assert freed == sum(stored for stored, _ in measured.values()) - sum(stored for stored, _ in left.values()) > 0


def test_a_format_4_store_is_read_then_upgraded_and_refused_by_its_release(tmp_path):
    """The last release of format 4 makes an encrypted store; this one reads and counts it from the blobs,
    a backup marks it format 6 (old blobs without size records, new ones with), and that release then
    refuses it."""
    old = previous_release(tmp_path, FORMAT_4_RELEASE)
    a, b = write_image(tmp_path / "a.img", 8, 3 * MiB), write_image(tmp_path / "b.img", 9, 3 * MiB)
    store = tmp_path / "s"
    previous_rpfs(old, store, "init", keep_key=True)
    previous_rpfs(old, store, "backup", "vm", f"--disk=d={a}", keep_key=True)
    before = json.loads(rpfs("usage", "--json", store=store).stdout)
    assert "format version  4" in rpfs("info", store=store).stdout   # reading does not upgrade
    rpfs("backup", "vm", f"--disk=d={b}", store=store)
    assert "format version  7" in rpfs("info", store=store).stdout
    with open_store(store) as s:
        measured = blobs(s)
        records = size_records(s)
        assert records and set(records) < set(measured)   # only the new backup's blobs have records
        assert all(records[d] == measured[d] for d in records)
        assert "blob_sizes" not in s.meta and all(s.has_block(d) for d in measured)   # by `blocks` then
        first, second = s.points("vm")
        assert second.disks[0].stored_bytes == distinct_stored(s, second, measured)
        assert read_all(s, first, "d") == a.read_bytes() and read_all(s, second, "d") == b.read_bytes()
    after = json.loads(rpfs("usage", "--json", store=store).stdout)
    assert before["stored_bytes"] < after["stored_bytes"] == sum(stored for stored, _ in measured.values())
    with open_store(store) as s:
        prune(s, {"vm": Retention(keep_last=1)})
    freed = json.loads(rpfs("gc", "--json", store=store).stdout)["freed_bytes"]
    with open_store(store) as s:
        assert freed == sum(stored for stored, _ in measured.values()) - sum(n for n, _ in blobs(s).values())
    with pytest.raises(Exception) as refused:
        previous_rpfs(old, store, "list", keep_key=True)
    assert b"format version 7; this rpfs reads versions 1 to 4" in refused.value.stderr
    with open_store(store) as s:   # a blob lost with its record left (an older rpfs's gc, or damage)
        lost = next(iter(records))
        s.write(lambda txn: txn.delete(lost, db=s.db("blocks")))
        assert not s.has_block(lost)   # an upgraded store asks `blocks`: the next backup stores it again
