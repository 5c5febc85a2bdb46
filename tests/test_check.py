"""rpfs check [--read-data] [--repair]: it finds what is wrong or left behind, repairs what it can, and
never changes anything without --repair."""
import json
import os
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import open_store, rpfs
from diskimages import make_whole_disk_ext4, random_disk
from test_backup import corrupt_one_block

from rpfs.host import run_dir
from rpfs.store.leases import LEASE_DIR, hold
from rpfs.store.block_maps import REF
from rpfs.store.catalogs import Catalog, Catalogs, Entry, encode_listing
from rpfs.upkeep.check import _catalogs


@pytest.fixture
def backed_up(tmp_path):
    store = tmp_path / "store"
    rpfs("init", store=store)
    disk = random_disk(tmp_path / "d.img", 3)
    point = json.loads(rpfs("backup", "vm", f"--disk=d={disk}", "--json", store=store).stdout)["point_id"]
    return store, disk, point


def check(store: Path, *flags: str) -> tuple[int, list[dict]]:
    done = rpfs("check", "--json", *flags, store=store, check=False)
    assert done.returncode in (0, 4), done.stderr
    return done.returncode, json.loads(done.stdout)["problems"]


def test_a_clean_store_is_clean(backed_up):
    store, _, _ = backed_up
    assert check(store) == (0, [])
    assert check(store, "--read-data") == (0, [])
    done = rpfs("check", store=store)
    assert "no problem left" in done.stdout


def test_wrong_refs_are_found_and_rebuilt_from_the_block_maps(backed_up):
    store, _, _ = backed_up
    with open_store(store) as s:
        digest = next(iter(s.ref_counts()[0]))
        s.write(lambda txn: txn.put(digest, REF.pack(7), db=s.db("refs")))
        s.write(lambda txn: txn.put(b"\1" * 32, REF.pack(1), db=s.db("refs")))
    code, problems = check(store)
    assert code == 4 and [p["kind"] for p in problems] == ["refs"] and "2 block(s)" in problems[0]["what"]
    assert check(store)[0] == 4                          # without --repair nothing changed
    code, problems = check(store, "--repair")
    assert code == 0 and problems[0]["repaired"]
    assert check(store) == (0, [])
    assert json.loads(rpfs("verify", "--json", store=store).stdout)["damaged"] == {}


def test_a_missing_block_map_is_named_by_verify_as_restore_finds_it(backed_up, tmp_path):
    """A damaged B-tree leaf can lose a block map's record: restore refuses, so verify must name the point
    (it read an absent map as an empty one before: found by the crash campaign's bit rot)."""
    store, _, point_id = backed_up
    with open_store(store) as s:
        s.write(lambda txn: txn.delete(s.map_key("vm", point_id, "d"), db=s.db("maps")))
    refused = rpfs("restore", "vm", "--disk", "d", "--to", str(tmp_path / "r.img"), store=store, check=False)
    assert refused.returncode != 0 and "block map missing" in refused.stderr
    done = rpfs("verify", "--json", store=store, check=False)
    assert done.returncode == 4, done.stderr
    assert "missing" in json.loads(done.stdout)["damaged"][f"vm/{point_id}"][0]


def test_a_point_listed_but_not_found_by_its_key_is_named_by_verify(backed_up, monkeypatch):
    """Bit rot in a branch page of the points table can hide a point from a lookup by key (what restore
    does) while a listing still shows it: verify took that for a point pruned meanwhile and skipped it
    (found by the crash campaign's bit rot)."""
    from rpfs.store.store import Store
    from rpfs.upkeep.verify import verify
    store, _, point_id = backed_up
    monkeypatch.setattr(Store, "has_point", lambda self, vm, wanted: False)   # every lookup misses
    with open_store(store) as s:
        result = verify(s)
    assert "cannot be looked up" in result.damaged[f"vm/{point_id}"][0]


def test_a_key_a_lookup_cannot_find_is_found_by_check(backed_up):
    """Bit rot in a branch page can send a lookup to the wrong leaf while a walk still lists every key:
    check walked tables but never looked their keys up, so it found nothing while restore could not find
    a point (found by the crash campaign's bit rot). Here a separator key of the jobs table is raised."""
    store, _, _ = backed_up
    with open_store(store) as s:
        for n in range(40):
            s.put_record("jobs", f"job-{n:03}", {"pad": "x" * 1000})
    data = bytearray((store / "data.mdb").read_bytes())
    raised = 0
    for page in range(0, len(data), 4096):   # every branch page (the live one, copies older transactions left)
        flags, lower = struct.unpack_from("<HH", data, page + 10)
        for node in range(16, lower if flags & 1 else 16, 2):
            key = page + struct.unpack_from("<H", data, page + node)[0] + 8
            if data[key:key + 5] == b"job-0":
                data[key:key + 5] = b"job-9"   # a separator now above the keys of the leaves after it
                raised += 1
                break
    assert raised, "the jobs table has no branch page"
    (store / "data.mdb").write_bytes(bytes(data))
    code, problems = check(store)
    assert code == 4 and any(p["kind"] == "table" and "jobs" in p["what"] for p in problems), problems


def test_damaged_and_missing_blocks_are_named_and_never_deleted(backed_up):
    store, _, point_id = backed_up
    with open_store(store) as s:
        point = s.point("vm", point_id)
        damaged = corrupt_one_block(s, point, "d")
        missing = next(d for d in s.ref_counts()[0] if d != damaged)
        s.write(lambda txn: txn.delete(missing, db=s.db("blocks")))
    code, problems = check(store, "--repair")
    assert code == 4
    whats = sorted(p["what"] for p in problems)
    assert any(damaged.hex()[:16] in w and "CRC" in w for w in whats), whats
    assert any(missing.hex()[:16] in w and "missing" in w for w in whats), whats
    assert not any(p["repaired"] for p in problems)
    with open_store(store) as s:
        assert s.has_block(damaged)                      # data is never deleted, even damaged


def test_leftovers_of_killed_processes_are_found_and_removed(backed_up, tmp_path):
    store, disk, point_id = backed_up
    orphan = disk.parent / ".rpfs-snapshots" / "vm" / "2020-01-01T000000Z" / "d.img"   # a killed backup's
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"clone")
    with open_store(store) as s:
        hold(s, "gone", "vm", point_id, tmp_path / "finished.img")       # an instant restore long finished
    stale = store / LEASE_DIR / "lease-999999-0"                         # a reader that died
    stale.write_text("[]")
    pid_file = run_dir.daemon_files(tmp_path / "nowhere")[0]             # a daemon that died
    run_dir.write_file(pid_file, f"{2 ** 22 + 7}\n")
    code, problems = check(store)
    assert code == 4 and sorted(p["kind"] for p in problems) == ["hold", "lease", "run-dir", "snapshot"]
    assert orphan.exists() and stale.exists() and pid_file.exists()      # nothing changed yet
    code, problems = check(store, "--repair")
    assert code == 0 and all(p["repaired"] for p in problems)
    assert not orphan.exists() and not stale.exists() and not pid_file.exists()
    assert not (store / LEASE_DIR / "hold-gone").exists()
    assert check(store) == (0, [])
    assert os.path.exists(disk)


def test_the_image_export_of_a_killed_backup_is_found_and_removed(backed_up):
    """A shut-off domain's export folder whose rpfs died with -9 (its owner is gone): named, then removed."""
    store, _, _ = backed_up
    folder = run_dir.make_folder(run_dir.make_folder(run_dir.root() / "nbd") / "0badc0de")
    run_dir.write_file(folder / "owner", f"{2 ** 22 + 7} 12345\n")
    code, problems = check(store)
    assert code == 4 and [(p["kind"], str(folder) in p["what"]) for p in problems] == [("run-dir", True)]
    assert folder.exists()
    code, problems = check(store, "--repair")
    assert code == 0 and problems[0]["repaired"] and not folder.exists()
    assert check(store) == (0, [])


@pytest.fixture
def cataloged(tmp_path):
    """Two points of an ext4 disk, cataloged by their backups (the second shares the first's listings)."""
    store = tmp_path / "store"
    rpfs("init", store=store)
    disk = make_whole_disk_ext4(tmp_path / "d.img", {"etc/nginx/nginx.conf": b"worker_processes 1;\n",
                                                     "var/www/index.html": b"<p>hello</p>\n"})
    points = [json.loads(rpfs("backup", "vm", f"--disk=d={disk}", "--json", store=store).stdout)["point_id"]
              for _ in range(2)]
    return store, points


def test_catalogs_are_checked_and_a_damaged_listing_names_its_points(cataloged):
    store, points = cataloged
    assert check(store) == (0, [])
    with open_store(store) as s:
        with s.read() as txn:
            listing_id, stored = next((bytes(k), bytearray(v)) for k, v in txn.cursor(db=s.db("listings")))
        stored[len(stored) // 2] ^= 0x40
        s.write(lambda txn: txn.put(listing_id, bytes(stored), db=s.db("listings")))
    found = rpfs("find", "nginx.conf", "vm", store=store, check=False)
    assert found.returncode == 3 and found.stderr.count("\n") == 1 and any(p in found.stderr for p in points), \
        found.stderr
    code, problems = check(store)
    assert code == 4 and sorted(p["kind"] for p in problems) == ["catalog", "catalog"], problems
    for point_id, problem in zip(sorted(points), sorted(problems, key=lambda p: p["what"])):
        assert f"catalog of vm/{point_id}: a listing is damaged ({listing_id.hex()[:16]})" in problem["what"]
        assert f"rpfs catalog vm {point_id}" in problem["what"]
    assert check(store)[0] == 4                          # without --repair nothing changed
    code, problems = check(store, "--repair")
    assert code == 0 and all(p["repaired"] for p in problems), problems
    assert check(store) == (0, [])
    with open_store(store) as s:
        assert [s.catalog("vm", p) for p in points] == [None, None] and s.stored_listing_ids() == []
        assert [s.point("vm", p).id for p in points] == points   # the points stay
    found = rpfs("find", "nginx.conf", "vm", store=store, check=False)
    assert found.returncode == 1 and "2 point(s) without a catalog" in found.stderr, found.stderr
    rpfs("catalog", "vm", points[0], store=store)
    assert check(store) == (0, [])
    found = json.loads(rpfs("find", "nginx.conf", "vm", "--json", store=store).stdout)
    assert points[0] in json.dumps(found)


def test_wrong_listing_counts_and_unreachable_listings_are_set_from_a_recount(cataloged):
    store, _ = cataloged
    with open_store(store) as s:
        listing_id = next(iter(s.listing_ref_counts()))
        s.write(lambda txn: txn.put(listing_id, REF.pack(9), db=s.db("listing_refs")))
        s.write(lambda txn: txn.put(b"\2" * 32, b"not a listing", db=s.db("listings")))
    code, problems = check(store)
    assert code == 4 and sorted(p["kind"] for p in problems) == ["catalog", "refs"], problems
    assert any("1 catalog listing(s)" in p["what"] for p in problems), problems
    assert any("1 stored catalog listing(s) that no catalog reaches" in p["what"] for p in problems), problems
    code, problems = check(store, "--repair")
    assert code == 0 and all(p["repaired"] for p in problems), problems
    assert check(store) == (0, [])
    assert rpfs("find", "index.html", "vm", store=store).returncode == 0


def test_a_killed_commands_attach_is_found_and_undone(cataloged):
    """What a catalog or restore-files killed -9 leaves: its lock file, free, beside its attach folder."""
    store, _ = cataloged
    place = run_dir.make_folder(run_dir.root() / "files")
    (place / "0badc0de").mkdir(mode=0o700)
    (place / "0badc0de.lock").write_bytes(b"")
    code, problems = check(store)
    assert code == 4 and [(p["kind"], "0badc0de" in p["what"]) for p in problems] == [("run-dir", True)], problems
    assert (place / "0badc0de").exists()
    code, problems = check(store, "--repair")
    assert code == 0 and problems[0]["repaired"] and list(place.iterdir()) == []
    assert check(store) == (0, [])


def _grown(s, catalog: Catalog, name: str) -> tuple[Catalog, dict[bytes, bytes]]:
    """The catalog with one folder more at the root of its first filesystem: a new root listing and a new
    listing of the folder (holding one file); every other listing shared with the catalog as it was."""
    fs = next(fs for fs in catalog.filesystems if fs.root)
    folder = encode_listing([Entry("file", "f", 1, 0o644, 0, 0, 0)])
    root = encode_listing(s.listing(bytes.fromhex(fs.root), "here")
                          + [Entry(name, "d", 0, 0o755, 0, 0, 0, folder=s.listing_id(folder))])
    grown = [replace(f, root=s.listing_id(root).hex()) if f is fs else f for f in catalog.filesystems]
    return (Catalog(catalog.vm, catalog.point_id, catalog.made, grown),
            {s.listing_id(folder): folder, s.listing_id(root): root})


def test_a_catalog_stored_beside_check_is_no_problem_and_its_listings_stay_through_repair(cataloged, monkeypatch):
    """rpfs catalog (and a backup's catalog step) takes no writer lock: a catalog stored while check reads the
    catalogs, or while --repair recounts them, is seen whole or not at all: no false problem, none of its new
    listings removed, the listings it shares counted. The put is forced at the first listing each reads: at
    once when that read lets a writer in, else (a write transaction) from a thread as soon as it ends."""
    store, points = cataloged
    with open_store(store) as s:
        existing = {("vm", p) for p in points}
        first, second = (_grown(s, s.catalog("vm", point_id), name) for point_id, name in zip(points, ("a", "b")))
        stale = min(s.listing_ref_counts())
        s.write(lambda txn: txn.put(stale, REF.pack(9), db=s.db("listing_refs")))   # a wrong count to repair
        writing, puts = threading.local(), []
        write, listing = s.write, Catalogs._listing

        def marked_write(fill, durable=True):
            writing.now = True
            try:
                write(fill, durable)
            finally:
                writing.now = False

        def put(grown):
            puts.append(s.put_catalog(*grown))

        def hooked(self, txn, listing_id, where):
            if pending:
                grown = pending.pop()
                if getattr(writing, "now", False):
                    threads.append(threading.Thread(target=put, args=(grown,)))
                    threads[-1].start()
                else:
                    put(grown)
            return listing(self, txn, listing_id, where)
        monkeypatch.setattr(s, "write", marked_write)
        monkeypatch.setattr(Catalogs, "_listing", hooked)
        pending, threads = [first], []
        problems = _catalogs(s, existing)   # the first catalog is stored while check reads
        assert puts == [sum(map(len, first[1].values()))]
        assert [(p.kind, p.what.split(" (")[0]) for p in problems] == [("refs", "the count is wrong for 1 catalog"
                                                                               " listing(s)")], problems
        pending = [second]
        for problem in problems:   # the second catalog is stored while --repair recounts
            problem.repair()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
        assert len(threads) == 1 and len(puts) == 2 and None not in puts   # the recount read in its write txn
        monkeypatch.undo()
        for point_id, (grown, listings) in zip(points, (first, second)):
            assert s.catalog("vm", point_id) == grown
            for listing_id, raw in listings.items():
                assert s.listing_bytes(listing_id, "here") == raw
        assert _catalogs(s, existing) == []   # counts right, nothing unreachable
    assert check(store) == (0, [])
    assert json.loads(rpfs("find", "b/file", "vm", "--json", store=store).stdout)
