"""The vault's logic against a folder bucket (folder_bucket.py, endpoint file:///path), in process and in
milliseconds: push and read back, gc's two runs and repack, the unsealed gc record, holds, key slots, a
push that fails between packs. test_vault.py runs the same paths against Ceph, through the CLI."""
from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest

from rpfs.backup.pipeline import backup
from rpfs.errors import RpfsError
from rpfs.serve.image import BlockCache, ImageReader
from rpfs.store.key_slots import KeyChoice, NewSlot, create_key_file
from rpfs.store.store import Store
from rpfs.vault import layout
from rpfs.vault.config import VaultConfig, checked
from rpfs.vault.folder_bucket import FolderBucket
from rpfs.vault.gc import gc, pending
from rpfs.vault.keys import send_key_slots
from rpfs.vault.push import push
from rpfs.vault.vault import Vault

BLOCK = 64 << 10
PACK = 4 * BLOCK - 1       # a pack holds four blocks (each a little over BLOCK: random data, sealed)
BIG = 1 << 20              # a pack holds every block and piece of a small point


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RPFS_CONFIG", str(tmp_path / "etc"))
    monkeypatch.setenv("RPFS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s3").mkdir(mode=0o700)
    key_file = tmp_path / "key"
    slot = NewSlot("key-file", create_key_file(key_file))
    with Store.init(tmp_path / "store", block_size=BLOCK, key_slots=[slot]) as store:
        config = checked(VaultConfig("local", f"file://{tmp_path / 's3'}", "bucket"))
        with Vault.create(config, store) as vault:
            yield store, vault, tmp_path


def _image(path: Path, seed: int, blocks: int = 8) -> Path:
    path.write_bytes(random.Random(seed).randbytes(blocks * BLOCK))
    return path


def _change(path: Path, seed: int, blocks: list[int]) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for block in blocks:
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))


def _reopened(vault: Vault, store: Store) -> Vault:
    return Vault.open(vault.config, KeyChoice(master=store.master_key))


def _read(source, point) -> bytes:
    disk = point.disk("os")
    reader = ImageReader(source, BlockCache(4 << 20), point.vm, point.id, disk)
    return reader.read(0, disk.size + 1)


def _objects(vault: Vault, under: str) -> list[str]:
    return [name for name, _size in vault.bucket.names(under)]


def test_pushed_points_read_back_through_the_vault(env):
    store, vault, tmp = env
    disk = _image(tmp / "os.img", 1)
    wanted = {}
    for n in range(3):
        point, _summary = backup(store, "web", [("os", str(disk))])
        wanted[point.id] = disk.read_bytes()
        _change(disk, 10 + n, [n, 5])
    summary = push(store, vault, store.points(), pack_bytes=PACK)
    assert len(summary.pushed) == 3 and summary.blobs == 8 + 2 + 2
    assert push(store, vault, store.points(), pack_bytes=PACK).pushed == []   # all there: nothing goes up
    with _reopened(vault, store) as fresh:
        assert [p.id for p in fresh.points("web")] == sorted(wanted)
        for point in fresh.points("web"):
            assert _read(fresh, point) == wanted[point.id]
    modes = {oct(os.lstat(path).st_mode & 0o777) for path in (tmp / "s3").rglob("*")}
    assert modes == {"0o700", "0o600"}


def test_gc_deletes_in_two_runs_what_no_manifest_needs(env):
    store, vault, tmp = env
    disk = _image(tmp / "os.img", 2)
    first, _ = backup(store, "web", [("os", str(disk))])
    push(store, vault, [first], pack_bytes=PACK)
    old_packs = set(_objects(vault, layout.PACKS))
    _image(disk, 3)
    second, _ = backup(store, "web", [("os", str(disk))])
    push(store, vault, [second], pack_bytes=PACK)
    vault.delete_point("web", first.id)
    condemned = gc(vault, pack_bytes=PACK)
    assert condemned.condemned_packs == len(old_packs) and condemned.deleted_packs == 0 and pending(vault)
    assert set(_objects(vault, layout.PACKS)) >= old_packs   # hidden only: a reader may still use them
    deleted = gc(vault, pack_bytes=PACK)
    assert deleted.deleted_packs == len(old_packs) and not pending(vault)
    assert not old_packs & set(_objects(vault, layout.PACKS))
    with _reopened(vault, store) as fresh:
        assert _read(fresh, fresh.point("web")) == disk.read_bytes()


def test_gc_repacks_a_half_empty_pack(env):
    store, vault, tmp = env
    disk = _image(tmp / "os.img", 4, blocks=4)
    first, _ = backup(store, "web", [("os", str(disk))])
    push(store, vault, [first], pack_bytes=BIG)
    (old_pack,) = _objects(vault, layout.PACKS)
    _change(disk, 5, [0, 1, 2])   # three of the four blocks change: the old pack is a quarter needed
    second, _ = backup(store, "web", [("os", str(disk))])
    push(store, vault, [second], pack_bytes=BIG)
    vault.delete_point("web", first.id)
    summary = gc(vault, pack_bytes=BIG)
    assert summary.repacked_packs == 1 and BLOCK <= summary.repacked_bytes < 2 * BLOCK
    assert gc(vault, pack_bytes=BIG).deleted_packs == 1 and old_pack not in _objects(vault, layout.PACKS)
    with _reopened(vault, store) as fresh:
        assert _read(fresh, fresh.point("web", second.id)) == disk.read_bytes()


def test_an_unsealed_gc_record_deletes_nothing_and_its_indexes_come_back(env):
    store, vault, tmp = env
    disk = _image(tmp / "os.img", 6, blocks=2)
    point, _ = backup(store, "web", [("os", str(disk))])
    push(store, vault, [point], pack_bytes=PACK)
    (pack,) = vault.objects.indexed_packs()
    sealed_index = vault.objects.index(pack)
    vault.objects.delete_index(pack)   # as an older gc left it: index hidden, record unsealed
    legacy = {"packs": {pack: base64.b64encode(sealed_index).decode()}, "locks": []}
    vault.bucket.put(layout.CONDEMNED, json.dumps(legacy).encode())
    assert gc(vault, pack_bytes=PACK).deleted_packs == 0
    assert vault.objects.indexed_packs() == [pack] and not pending(vault)
    vault.bucket.put(layout.CONDEMNED, b"\0" * 64)
    with pytest.raises(RpfsError, match="gc/condemned is damaged"):
        gc(vault, pack_bytes=PACK)
    vault.objects.delete_condemned()
    with _reopened(vault, store) as fresh:
        assert _read(fresh, fresh.point("web")) == disk.read_bytes()


def test_a_hold_keeps_a_pruned_point_readable(env):
    store, vault, tmp = env
    disk = _image(tmp / "os.img", 7, blocks=4)
    point, _ = backup(store, "web", [("os", str(disk))])
    push(store, vault, [point], pack_bytes=PACK)
    packs = _objects(vault, layout.PACKS)
    vault.hold("restore-1", "web", point.id, "/dev/null")
    assert [h.point_id for h in vault.holds()] == [point.id]
    vault.delete_point("web", point.id)   # pruned while an instant restore copies it
    assert gc(vault, pack_bytes=PACK).condemned_packs == 0 and gc(vault, pack_bytes=PACK).deleted_packs == 0
    with _reopened(vault, store) as fresh:
        fresh.adopt_hold("restore-1")
        assert _read(fresh, fresh.point("web", point.id)) == disk.read_bytes()
    vault.release_hold("restore-1")
    assert not _objects(vault, layout.HOLDS)
    gc(vault, pack_bytes=PACK)
    assert gc(vault, pack_bytes=PACK).deleted_packs == len(packs) == 2 and not _objects(vault, layout.PACKS)


def test_key_slots_follow_the_store(env):
    store, vault, tmp = env
    second = tmp / "second-key"
    slot, _added = store.add_key_slot(NewSlot("key-file", create_key_file(second)))
    assert send_key_slots(vault.config, store) is None
    Vault.open(vault.config, KeyChoice(key_file=str(second))).close()   # the new key opens the vault
    store.remove_key_slot(slot.id)
    assert send_key_slots(vault.config, store) is None
    with pytest.raises(RpfsError):
        Vault.open(vault.config, KeyChoice(key_file=str(second)))   # a removed key no longer does
    Vault.open(vault.config, KeyChoice(key_file=str(tmp / "key"))).close()


class _FailingBucket(FolderBucket):
    """The vault's folder, whose third pack upload fails (a push killed between packs)."""
    packs_left = 2

    def put_stream(self, name: str, stream) -> None:
        if name.startswith(layout.PACKS):
            if self.packs_left == 0:
                raise RpfsError("the network went away")
            self.packs_left -= 1
        super().put_stream(name, stream)


def test_a_push_that_fails_between_packs_leaves_no_half_point(env):
    store, vault, tmp = env
    disk = _image(tmp / "os.img", 8, blocks=16)
    point, _ = backup(store, "web", [("os", str(disk))])
    failing = _FailingBucket(vault.bucket.label, vault.bucket.endpoint, vault.bucket.name)
    vault.bucket = vault.objects.bucket = failing
    with pytest.raises(RpfsError, match="network went away"):
        push(store, vault, [point], pack_bytes=PACK)
    assert not _objects(vault, layout.POINTS) and not _objects(vault, layout.LOCKS)
    assert len(vault.objects.indexed_packs()) == 2 and not failing.unfinished_uploads(layout.PACKS)
    with _reopened(vault, store) as fresh:
        summary = push(store, fresh, [point], pack_bytes=PACK)
        assert summary.pushed == [f"web/{point.id}"] and summary.blobs == 16 - 8
    with _reopened(vault, store) as fresh:
        assert _read(fresh, fresh.point("web")) == disk.read_bytes()


def test_the_s3_session_still_loads_what_role_and_sso_credentials_need():
    """vault/s3._S3Only lists only the services rpfs needs (a faster start): the credential providers of
    role profiles, web identity and SSO make STS, SSO and SSO-OIDC clients, which must still load."""
    from rpfs.vault import s3
    session = s3._session()
    for service in ("s3", "sts", "sso", "sso-oidc"):
        assert session.client(service, region_name="us-east-1").meta.service_model.service_name == service
