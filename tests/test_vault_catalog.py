"""Catalogs in the vault (issue 26): pushed with their points, read from the vault alone, pruned and collected.

The first tests run against a folder bucket (folder_bucket.py) in process, with catalogs made from listings
written here; the last ones catalog real ext4 images (catalog_point) and push them to Ceph (tools/ceph),
one of them killing the push with SIGKILL. Run with `flock /tmp/rpfs-ceph.lock`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rpfs.backup.pipeline import backup
from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.store.catalogs import CATALOGED, Catalog, CatalogedFilesystem, Entry, encode_listing, subfolders
from rpfs.store.key_slots import KeyChoice, NewSlot, create_key_file
from rpfs.store.store import Store
from rpfs.vault import layout
from rpfs.vault.config import VaultConfig, checked
from rpfs.vault.folder_bucket import FolderBucket
from rpfs.vault.gc import gc
from rpfs.vault.push import push
from rpfs.vault.vault import LISTING, Vault

pytestmark = pytest.mark.timeout(300)

BLOCK = 64 << 10
PACK = 4 * BLOCK - 1


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RPFS_CONFIG", str(tmp_path / "etc"))
    monkeypatch.setenv("RPFS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s3").mkdir(mode=0o700)
    slot = NewSlot("key-file", create_key_file(tmp_path / "key"))
    with Store.init(tmp_path / "store", block_size=BLOCK, key_slots=[slot]) as store:
        config = checked(VaultConfig("local", f"file://{tmp_path / 's3'}", "bucket"))
        with Vault.create(config, store) as vault:
            yield store, vault, tmp_path


def _point(store: Store, tmp: Path, seed: int):
    disk = tmp / "os.img"
    disk.write_bytes(random.Random(seed).randbytes(4 * BLOCK))
    return backup(store, "web", [("os", str(disk))])[0]


def _file(name: str, size: int = 10) -> Entry:
    return Entry(name, "f", size, 0o644, 0, 0, 1_700_000_000 * 10**9)


def _catalog(store: Store, point, files: dict[str, int]) -> Catalog:
    """Catalog the point as holding files (path -> size) on one filesystem: one listing per folder."""
    listings: dict[bytes, bytes] = {}

    def folder(prefix: str) -> bytes:
        entries, subs = [], set()
        for path, size in files.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest:
                subs.add(rest.split("/", 1)[0])
            else:
                entries.append(_file(rest, size))
        for sub in sorted(subs):
            entries.append(Entry(sub, "d", 0, 0o755, 0, 0, 0, folder=folder(prefix + sub + "/")))
        raw = encode_listing(entries)
        listings[store.listing_id(raw)] = raw
        return store.listing_id(raw)
    root = folder("")
    fs = CatalogedFilesystem("os", "disk", None, "ext4", CATALOGED, root.hex(), len(files), 0, sum(files.values()))
    catalog = Catalog(point.vm, point.id, "2026-12-07T00:00:00+00:00", [fs])
    assert store.put_catalog(catalog, listings) is not None
    return catalog


def _tree(reader, catalog: Catalog) -> dict[bytes, list[Entry]]:
    """Every listing a catalog reaches, by id, read through reader (a Store or a Vault)."""
    found, pending = {}, catalog.roots()
    while pending:
        listing_id = pending.pop()
        if listing_id not in found:
            found[listing_id] = reader.listing(listing_id, f"{catalog.vm}/{catalog.point_id}")
            pending.extend(e.folder for e in found[listing_id] if e.folder)
    return found


def _reopened(vault: Vault, store: Store) -> Vault:
    return Vault.open(vault.config, KeyChoice(master=store.master_key))


def _counted(vault: Vault) -> list[str]:
    """The kinds of object (packs, catalogs, ...) each GET of the vault's bucket reads from now on."""
    gets, get = [], vault.bucket.get

    def counting(name: str, *args):
        gets.append(name.split("/")[0])
        return get(name, *args)
    vault.bucket.get = counting
    return gets


def _vault_listings(vault: Vault) -> set[bytes]:
    return {entry_id for kind, entry_id in vault.index(fresh=True) if kind == LISTING}


FILES = {"etc/hosts": 10, "etc/nginx/nginx.conf": 200, "var/log/syslog": 5000, "README": 3}


def test_a_pushed_catalog_reads_the_same_from_the_vault_alone(env):
    store, vault, tmp = env
    first = _point(store, tmp, 1)
    second = _point(store, tmp, 2)
    catalogs = [_catalog(store, first, FILES), _catalog(store, second, {**FILES, "etc/hosts": 11})]
    summary = push(store, vault, store.points(), pack_bytes=PACK)
    assert summary.catalogs == [f"web/{first.id}", f"web/{second.id}"]
    assert summary.listings == 5 + 2   # the second point shares every folder but / and etc/
    with _reopened(vault, store) as fresh:
        fresh.index()
        gets = _counted(fresh)
        for catalog in catalogs:
            assert fresh.catalog("web", catalog.point_id) == catalog
            assert _tree(fresh, catalog) == _tree(store, catalog)
            for listing_id in _tree(store, catalog):
                assert fresh.listing_bytes(listing_id, "here") == store.listing_bytes(listing_id, "here")
        packs = {fresh.index()[(LISTING, i)].pack for c in catalogs for i in _tree(store, c)}
        assert gets.count("packs") == len(packs)   # listings come in runs, each read once
        assert fresh.catalog("web", "nothing") is None
        assert fresh.settings["format_version"] == 3
        assert sorted(fresh.catalog_keys()) == [("web", first.id), ("web", second.id)]
    again = push(store, vault, store.points(), pack_bytes=PACK)
    assert again.catalogs == [] and again.listings == 0 and again.packs == 0


def test_a_point_cataloged_after_its_push_gets_its_catalog_by_the_next_push(env):
    store, vault, tmp = env
    point = _point(store, tmp, 3)
    push(store, vault, [point], pack_bytes=PACK)
    assert vault.catalog("web", point.id) is None and not vault.objects.catalog_names()
    catalog = _catalog(store, point, FILES)
    summary = push(store, vault, store.points(), pack_bytes=PACK)
    assert summary.pushed == [] and summary.catalogs == [f"web/{point.id}"] and summary.listings == 5
    with _reopened(vault, store) as fresh:
        assert fresh.catalog("web", point.id) == catalog and _tree(fresh, catalog) == _tree(store, catalog)
    recataloged = _catalog(store, point, {**FILES, "new": 1})   # cataloged again: the store's differs
    summary = push(store, vault, store.points(), pack_bytes=PACK)
    assert summary.catalogs == [f"web/{point.id}"] and summary.listings == 1
    with _reopened(vault, store) as fresh:
        assert fresh.catalog("web", point.id) == recataloged
        assert _tree(fresh, recataloged) == _tree(store, recataloged)


def test_prune_and_gc_keep_exactly_the_listings_a_catalog_names(env):
    store, vault, tmp = env
    first = _point(store, tmp, 4)
    second = _point(store, tmp, 5)
    _catalog(store, first, {**FILES, "old/only/here": 1})
    kept = _catalog(store, second, FILES)
    push(store, vault, store.points(), pack_bytes=PACK)
    vault.delete_point("web", first.id)
    assert vault.objects.catalog_names() == [("web", second.id)]
    gc(vault, pack_bytes=PACK)
    gc(vault, pack_bytes=PACK)
    with _reopened(vault, store) as fresh:
        assert _vault_listings(fresh) == set(_tree(store, kept))   # old/ and old/only/ and the old root went
        assert _tree(fresh, kept) == _tree(store, kept)

    # A prune killed between the manifest and the catalog: gc removes the catalog left behind.
    vault.objects.delete_manifest("web", second.id)
    summary = gc(vault, pack_bytes=PACK)
    assert summary.removed_catalogs == 1 and not vault.objects.catalog_names()
    gc(vault, pack_bytes=PACK)
    assert not _vault_listings(vault)


def test_gc_repacks_the_listings_still_named_out_of_a_pruned_points_pack(env):
    store, vault, tmp = env
    first = _point(store, tmp, 4)
    _catalog(store, first, {**FILES, "old/only/here": 1})
    push(store, vault, [first], pack_bytes=1 << 20)   # one pack: its blobs, its piece, its listings
    second = _point(store, tmp, 5)
    kept = _catalog(store, second, FILES)   # shares every listing but the root with the first
    push(store, vault, [second], pack_bytes=1 << 20)
    vault.delete_point("web", first.id)
    assert gc(vault, pack_bytes=1 << 20).repacked_packs == 1
    gc(vault, pack_bytes=1 << 20)
    with _reopened(vault, store) as fresh:
        assert _vault_listings(fresh) == set(_tree(store, kept))
        assert _tree(fresh, kept) == _tree(store, kept)


def test_a_damaged_listing_reads_as_an_error_naming_where(env):
    store, vault, tmp = env
    point = _point(store, tmp, 6)
    catalog = _catalog(store, point, FILES)
    push(store, vault, [point], pack_bytes=PACK)
    root = catalog.roots()[0]
    location = vault.index()[(LISTING, root)]
    path = tmp / "s3" / "bucket" / layout.pack_object(location.pack)
    data = bytearray(path.read_bytes())
    data[location.offset + location.length // 2] ^= 1
    path.write_bytes(bytes(data))
    with _reopened(vault, store) as fresh:
        with pytest.raises(CorruptBlockError, match=f"web/{point.id}"):
            fresh.listing(root, f"web/{point.id}")
        with pytest.raises(CorruptBlockError, match="missing"):
            fresh.listing(bytes(32), "web/x")


def test_a_damaged_local_listing_leaves_its_catalog_out_of_the_push_with_a_note(env):
    store, vault, tmp = env
    point = _point(store, tmp, 8)
    catalog = _catalog(store, point, FILES)
    etc = next(e.folder for e in store.listing(catalog.roots()[0], "here") if e.name == "etc")
    store.write(lambda txn: txn.put(etc, b"damaged", db=store._dbs["listings"]))   # as rot would
    summary = push(store, vault, [point], pack_bytes=PACK)
    assert summary.pushed == [f"web/{point.id}"] and summary.catalogs == [] and summary.listings == 0
    assert len(summary.notes) == 1 and f"the catalog of web/{point.id} was not pushed" in summary.notes[0]
    assert vault.catalog("web", point.id) is None   # no catalog rather than a shorter one


def test_a_catalog_left_out_for_damage_never_keeps_a_shared_listing_from_the_next_catalog(env):
    """Two points share folder z/; a listing only the first reaches is damaged in the store. The first plan
    walks z/ before it fails: the second must still send z/, or its catalog object would name a listing
    the vault never got."""
    store, vault, tmp = env
    first, second = _point(store, tmp, 10), _point(store, tmp, 11)
    damaged = _catalog(store, first, {"a/x": 1, "z/y": 2})   # walked from the last folder: z/, then a/
    kept = _catalog(store, second, {"b/w": 7, "z/y": 2})
    a = next(e.folder for e in store.listing(damaged.roots()[0], "here") if e.name == "a")
    store.write(lambda txn: txn.put(a, b"damaged", db=store._dbs["listings"]))   # as rot would
    summary = push(store, vault, [first, second], pack_bytes=PACK)
    assert summary.pushed == [f"web/{first.id}", f"web/{second.id}"] and summary.catalogs == [f"web/{second.id}"]
    assert len(summary.notes) == 1 and f"the catalog of web/{first.id} was not pushed" in summary.notes[0]
    with _reopened(vault, store) as fresh:
        assert fresh.catalog("web", first.id) is None
        assert _tree(fresh, kept) == _tree(store, kept)


def test_a_catalog_object_naming_listings_the_vault_lacks_is_repaired_by_the_next_push(env):
    """A catalog object written while listings it names never went up (as an older push could): the next
    push finds them missing from the vault's index, sends them from the store and writes the object again."""
    store, vault, tmp = env
    point = _point(store, tmp, 12)
    push(store, vault, [point], pack_bytes=PACK)
    catalog = _catalog(store, point, FILES)
    listings = list(_tree(store, catalog))
    vault.objects.put_catalog("web", point.id, layout.CatalogObject(catalog, listings).encode(vault.keyring))
    with _reopened(vault, store) as fresh:
        with pytest.raises(CorruptBlockError, match="missing"):
            _tree(fresh, catalog)
    summary = push(store, vault, [point], pack_bytes=PACK)
    assert summary.pushed == [] and summary.catalogs == [f"web/{point.id}"] and summary.listings == len(listings)
    with _reopened(vault, store) as fresh:
        assert fresh.catalog("web", point.id) == catalog and _tree(fresh, catalog) == _tree(store, catalog)
    again = push(store, vault, [point], pack_bytes=PACK)
    assert again.catalogs == [] and again.listings == 0 and again.packs == 0


class _GcFirstBucket(FolderBucket):
    """The vault's folder, where a gc runs (on another handle) just before the first catalog object is written."""
    gc_runs: list = []
    other: Vault | None = None

    def put(self, name: str, data: bytes) -> None:
        if name.startswith(layout.CATALOGS) and not self.gc_runs:
            self.gc_runs.append(gc(self.other, pack_bytes=PACK))
        super().put(name, data)


def test_a_gc_beside_a_push_never_removes_the_listings_its_catalog_names(env):
    """A push relies on listings the vault holds (a pack of their own no catalog names: its catalog object
    went); a gc condemns that pack before the push writes the catalog object that names them. The next gc
    finds the catalog object and rescues the pack: the catalog reads whole."""
    store, vault, tmp = env
    point = _point(store, tmp, 9)
    push(store, vault, [point], pack_bytes=PACK)
    catalog = _catalog(store, point, FILES)
    push(store, vault, [point], pack_bytes=PACK)   # the listings in a pack of their own, then the catalog
    vault.objects.delete_catalog("web", point.id)
    racing = _GcFirstBucket(vault.bucket.label, vault.bucket.endpoint, vault.bucket.name)
    racing.gc_runs, racing.other = [], _reopened(vault, store)
    with _reopened(vault, store) as pushing:
        pushing.bucket = pushing.objects.bucket = racing
        summary = push(store, pushing, [point], pack_bytes=PACK)
    assert summary.catalogs == [f"web/{point.id}"] and summary.listings == 0   # it relied on the vault's
    assert racing.gc_runs[0].condemned_packs == 1
    assert gc(vault, pack_bytes=PACK).rescued_packs == 1
    gc(vault, pack_bytes=PACK)
    with _reopened(vault, store) as fresh:
        assert _tree(fresh, catalog) == _tree(store, catalog)


class _FailingBucket(FolderBucket):
    """The vault's folder, whose catalog objects cannot be written (a push killed after the manifest)."""

    def put(self, name: str, data: bytes) -> None:
        if name.startswith(layout.CATALOGS):
            raise RpfsError("the network went away")
        super().put(name, data)


def test_a_push_stopped_before_the_catalog_object_sends_it_next_time(env):
    store, vault, tmp = env
    point = _point(store, tmp, 7)
    catalog = _catalog(store, point, FILES)
    failing = _FailingBucket(vault.bucket.label, vault.bucket.endpoint, vault.bucket.name)
    vault.bucket = vault.objects.bucket = failing
    with pytest.raises(RpfsError, match="network went away"):
        push(store, vault, [point], pack_bytes=PACK)
    assert vault.objects.point_names() == [("web", point.id)] and not vault.objects.catalog_names()
    with _reopened(vault, store) as fresh:
        summary = push(store, fresh, [point], pack_bytes=PACK)
        assert summary.pushed == [] and summary.catalogs == [f"web/{point.id}"] and summary.listings == 0
    with _reopened(vault, store) as fresh:
        assert _tree(fresh, catalog) == _tree(store, catalog)


# -- real ext4 images, cataloged by catalog_point, pushed to Ceph (tools/ceph) ------------------------------

from test_vault import _add, _client, _objects, _pushing, _wait_until, ceph, vault_env  # noqa: E402,F401


def _catalog_all(store_path: Path) -> dict[str, tuple[Catalog, dict[bytes, list[Entry]]]]:
    """Catalog every point of the store (catalog_point); point id -> its catalog and its listings by id."""
    from cli_helpers import open_store

    from rpfs.catalog.build import catalog_point
    found = {}
    with open_store(store_path) as store:
        for point in store.points("web"):
            catalog_point(store, point)
            catalog = store.catalog("web", point.id)
            assert catalog.filesystems[0].status == CATALOGED
            found[point.id] = (catalog, _tree(store, catalog))
    return found


def _from_the_vault_alone(store_path: Path, wanted: dict[str, tuple[Catalog, dict[bytes, list[Entry]]]]) -> None:
    """With the store's database gone, the vault answers each catalog and listing as the store did."""
    from cli_helpers import session_keys

    from rpfs.vault.named import open_vault
    (store_path / "data.mdb").unlink()
    with open_vault("offsite", session_keys()) as vault:
        assert sorted(vault.catalog_keys()) == [("web", point_id) for point_id in sorted(wanted)]
        for point_id, (catalog, tree) in wanted.items():
            assert vault.catalog("web", point_id) == catalog
            assert _tree(vault, catalog) == tree


def _ext4(path: Path, files: dict[str, bytes], size_mib: int = 32) -> Path:
    from diskimages import make_whole_disk_ext4
    return make_whole_disk_ext4(path, files, size_mib << 20)


def test_catalogs_of_an_ext4_image_pushed_to_ceph_answer_from_the_vault_alone(vault_env, area):
    from cli_helpers import rpfs
    from diskimages import random_files

    from rpfs.vault.named import open_vault
    store, disk = area / "store", area / "os.img"
    files = random_files(1, count=12)
    rpfs("init", store=store)
    rpfs("backup", "web", "--no-catalog", "--disk", f"os={_ext4(disk, files)}", store=store)
    _add(vault_env, store)
    rpfs("vault", "push", "offsite", store=store)   # before it has a catalog
    rpfs("backup", "web", "--no-catalog", "--disk",
         f"os={_ext4(disk, {**files, 'dir1/sub1/file001.bin': b'changed'})}", store=store)
    wanted = _catalog_all(store)
    first, second = sorted(wanted)
    changed = [e for e in wanted[second][1].values() if any(f.name == "file001.bin" for f in e)]
    assert changed and all(e not in wanted[first][1].values() for e in changed)   # a folder changed

    pushed = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert pushed["pushed"] == [f"web/{second}"] and sorted(pushed["catalogs"]) == [f"web/{first}", f"web/{second}"]
    assert pushed["listings"] == len(set(wanted[first][1]) | set(wanted[second][1]))
    again = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert again["catalogs"] == [] and again["packs"] == 0

    # A flipped byte in a listing's pack entry reads as an error naming the point, never as a listing.
    from cli_helpers import session_keys
    with open_vault("offsite", session_keys()) as vault:
        root = wanted[second][0].roots()[0]
        location = vault.index()[(LISTING, root)]
    s3 = _client(vault_env["endpoint"])
    key = layout.pack_object(location.pack)
    data = bytearray(s3.get_object(Bucket=vault_env["bucket"], Key=key)["Body"].read())
    data[location.offset + location.length // 2] ^= 1
    s3.put_object(Bucket=vault_env["bucket"], Key=key, Body=bytes(data))
    with open_vault("offsite", session_keys()) as vault:
        with pytest.raises(CorruptBlockError, match=f"web/{second}"):
            vault.listing(root, f"web/{second}")
    data[location.offset + location.length // 2] ^= 1
    s3.put_object(Bucket=vault_env["bucket"], Key=key, Body=bytes(data))

    # Pruned in the vault, then two gc runs: the listings only the first point named go, the rest stay.
    with open_vault("offsite", session_keys()) as vault:
        vault.delete_point("web", first)
    for _run in range(2):
        rpfs("vault", "gc", "offsite")
    with open_vault("offsite", session_keys()) as vault:
        assert {i for kind, i in vault.index(fresh=True) if kind == LISTING} == set(wanted[second][1])
    del wanted[first]
    _from_the_vault_alone(store, wanted)

    # The commands, with no store at all: find, ls, diff's refusal of a pruned point, restore-files.
    (store / "data.mdb").exists() and (store / "data.mdb").unlink()
    found = json.loads(rpfs("--vault", "offsite", "find", "file001.bin", "web", "--json").stdout)["found"]
    assert [(f["path"], [v["points"] for v in f["versions"]]) for f in found] == \
        [("/dir1/sub1/file001.bin", [[second]])]
    listed = json.loads(rpfs("--vault", "offsite", "ls", "web", second, "/dir1/sub1", "--json").stdout)
    assert "file001.bin" in [e["name"] for e in listed["folders"][0]["entries"]]
    to = area / "recovered"
    rpfs("--vault", "offsite", "restore-files", "web", second, "/dir1/sub1/file001.bin", "--to", str(to))
    assert (to / "dir1/sub1/file001.bin").read_bytes() == b"changed"


def test_a_push_killed_with_sigkill_then_run_again_yields_the_catalogs_whole(vault_env, area):
    from cli_helpers import rpfs
    store, disk = area / "store", area / "os.img"
    rng = random.Random(9)
    files = {f"data/big{n}.bin": rng.randbytes(8 << 20) for n in range(5)}
    files.update({f"etc/conf{n}/file": b"x" * n for n in range(20)})
    rpfs("init", store=store)
    rpfs("backup", "web", "--disk", f"os={_ext4(disk, files, 64)}", store=store)
    _add(vault_env, store)
    wanted = _catalog_all(store)
    with _pushing(store, "--limit-mbps", "8", "--pack-mib", "2") as pushing:
        _wait_until(lambda: len(_objects(vault_env, "index/")) >= 3, pushing)   # three packs whole and indexed
        pushing.send_signal(signal.SIGKILL)
    assert not _objects(vault_env, "points/") and not _objects(vault_env, "catalogs/")   # nothing half there
    resumed = json.loads(rpfs("vault", "push", "offsite", "--json", store=store).stdout)
    assert resumed["catalogs"] == [f"web/{point_id}" for point_id in wanted]
    _from_the_vault_alone(store, wanted)
