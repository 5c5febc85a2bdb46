"""One set of checks over every RecoverySource (store/source.py): the store, its reader processes
(IsolatedStore) and a vault (against the Ceph gateway: tests/test_vault.py). Each reads the same two
recovery points of the same store, so each must answer the same."""
from __future__ import annotations

import inspect
import uuid
from pathlib import Path

import pytest
from cli_helpers import open_store, rpfs, session_keys
from test_vault import _change, _image, ceph, remove_bucket  # noqa: F401 (a fixture)

from rpfs.errors import RpfsError
from rpfs.serve.image import BlockCache, ImageReader, load_block
from rpfs.serve.store_mount import open_for_daemon
from rpfs.store.isolated import IsolatedStore
from rpfs.store.leases import holds, leased_points
from rpfs.store.recovery_point import DIGEST_SIZE, HOLE
from rpfs.store.source import RecoverySource

pytestmark = pytest.mark.timeout(300)
KINDS = ["store", "isolated", "vault"]
SIZE_MIB = 8


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """A store (made by `rpfs init`: encrypted) with two backups of VM web, disk os changed between them;
    and the disk's bytes at each."""
    root = tmp_path_factory.mktemp("sources")
    store, disk = root / "store", _image(root / "os.img", 31, size_mib=SIZE_MIB)
    rpfs("init", store=store)
    copies = []
    for changed in ([], [0, 5]):
        _change(disk, 32, changed)
        rpfs("backup", "web", "--disk", f"os={disk}", store=store)
        copies.append(disk.read_bytes())
    return store, copies


@pytest.fixture(scope="module")
def vault_of_made(ceph, made):  # noqa: F811 (the fixture)
    """The store's vault `offsite` in a bucket of this module's own, both points pushed; emptied afterwards."""
    bucket = f"rpfs-test-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in ceph.items():
            env.setenv(name, value)
        env.setenv("RPFS_CONFIG", str(made[0].parent / "etc"))
        try:
            rpfs("vault", "add", "offsite", "--endpoint", ceph["RPFS_S3_ENDPOINT"], "--bucket", bucket, store=made[0])
            rpfs("vault", "push", "offsite", store=made[0])
            yield "offsite"
        finally:
            remove_bucket(ceph["RPFS_S3_ENDPOINT"], bucket)


@pytest.fixture(params=KINDS)
def source(request, made) -> RecoverySource:
    """The store of `made` as each kind of source, opened to read."""
    if request.param == "vault":
        from rpfs.vault.named import open_vault
        request.getfixturevalue("vault_of_made")
        with open_vault("offsite", session_keys()) as vault:
            yield vault
        return
    with open_store(made[0], readonly=True) as store:
        if request.param == "store":
            yield store
            return
        with IsolatedStore.open(store.path, store.master_key) as isolated:
            yield isolated


@pytest.fixture
def kind(request) -> str:
    """Which of KINDS the test's source is."""
    return request.node.callspec.params["source"]


def test_every_member_of_the_protocol_is_there_with_its_parameters(source):
    members = [name for name in dir(RecoverySource) if not name.startswith("_") or name in ("__enter__", "__exit__")]
    for name in [*RecoverySource.__annotations__, *members]:
        assert hasattr(source, name), name
    for name in members:
        wanted = inspect.getattr_static(RecoverySource, name)
        if callable(wanted) or isinstance(wanted, staticmethod):
            found = inspect.signature(getattr(type(source), name))
            assert list(found.parameters) == list(inspect.signature(getattr(RecoverySource, name)).parameters), name


def test_points_listed(source, made):
    ids = source.point_ids("web")
    assert len(ids) == 2 and ids == sorted(ids)   # oldest first
    assert source.vms() == ["web"]
    assert [p.id for p in source.points("web")] == ids == [p.id for p in source.points()]
    assert all(source.has_point("web", point_id) for point_id in ids)
    assert not source.has_point("web", "2000-01-01T000000Z") and not source.has_point("nobody", ids[0])
    assert source.point_ids("nobody") == [] and source.points("nobody") == []
    assert source.stored_bytes() > 0


def test_a_point_by_id_and_the_latest(source):
    first, latest = source.point_ids("web")
    assert source.latest_point_id("web") == latest and source.latest_point_id("nobody") is None
    assert source.point("web").id == source.point("web", "latest").id == latest
    point = source.point("web", first)
    assert point.id == first and point.vm == "web"
    assert [d.name for d in point.disks] == ["os"] and point.disk("os").size == SIZE_MIB << 20
    with pytest.raises(RpfsError):
        source.point("nobody")
    with pytest.raises(RpfsError):
        source.point("web", "2000-01-01T000000Z")


def test_block_maps_and_digests(source):
    for point in source.points("web"):
        disk = point.disk("os")
        key = source.map_key("web", point.id, "os")
        block_map = source.block_map(key)
        assert len(block_map) == disk.blocks * DIGEST_SIZE
        digests = [source.block_digest(key, index) for index in range(disk.blocks)]
        assert b"".join(digests) == block_map
        assert digests.count(HOLE) == disk.zero_blocks > 0   # the image has holes: every other MiB


def test_images_read_back_whole(source, made):
    for point, copy in zip(source.points("web"), made[1]):
        reader = ImageReader(source, BlockCache(0), "web", point.id, point.disk("os"))
        assert reader.read(0, reader.size) == copy


def test_get_blob_whole_and_in_part(source, made):
    point = source.point("web")
    disk, copy = point.disk("os"), made[1][-1]
    key = source.map_key("web", point.id, "os")
    index = next(i for i in range(disk.blocks) if source.block_digest(key, i) != HOLE)
    digest, length = source.block_digest(key, index), disk.block_size
    block = copy[index * length:(index + 1) * length]
    assert load_block(source, digest, length) == block
    for start, stop in [(0, 4096), (65536 - 10, 65536 + 10), (length - 4096, length), (12345, 700000)]:
        assert load_block(source, digest, length, start, stop) == block[start:stop]
    reader = ImageReader(source, BlockCache(0), "web", point.id, disk)
    assert reader.read_frames(index * length + 100, 5000) == block[100:5100]   # a random read: frames only
    assert source.get_blob(bytes(range(32))) is None   # no such blob


@pytest.mark.parametrize("shared_bytes", [4096, 1 << 20])
def test_reader_processes_hand_blobs_over_in_shared_memory_or_the_socket(made, shared_bytes):
    """A blob or Cut that fits the memory shared with a reader comes through it, a larger one through the
    socket (4 KiB: every blob and Cut; 1 MiB: a whole blob of random data does not fit, its Cuts do)."""
    with open_store(made[0], readonly=True) as store, \
            IsolatedStore.open(store.path, store.master_key, shared_bytes=shared_bytes) as isolated:
        point = store.point("web")
        disk, key = point.disk("os"), store.map_key("web", point.id, "os")
        for index in range(disk.blocks):
            digest = store.block_digest(key, index)
            if digest == HOLE:
                continue
            assert isolated.get_blob(digest) == store.get_blob(digest)
            block = load_block(store, digest, disk.block_size)
            assert load_block(isolated, digest, disk.block_size) == block
            assert load_block(isolated, digest, disk.block_size, 70000, 140000) == block[70000:140000]


def test_a_point_is_kept_while_it_is_read(source, kind, tmp_path):
    """keeper: a store leases the point (prune skips it) for as long as it is kept, a vault keeps nothing
    (nothing on this host prunes it); hold: the point is kept across processes until released (a store's
    hold file, a vault's hold object), and refused once it is gone."""
    point_id = source.point_ids("web")[0]

    def kept_here() -> set:
        return set() if kind == "vault" else set(leased_points(source.path))
    with source.keeper() as keeper:
        keeper.take("web", point_id)
        assert kept_here() == (set() if kind == "vault" else {("web", point_id)})
        disk = source.point("web", point_id).disk("os")
        assert len(ImageReader(source, BlockCache(0), "web", point_id, disk).read(0, 4096)) == 4096
        keeper.remove("web", point_id)
        assert kept_here() == set()
        keeper.take("web", point_id)
    assert kept_here() == set()

    def held() -> set:
        if kind == "vault":   # holds/<machine>-<name>
            return {(h.name.split("-", 1)[1], h.vm, h.point_id) for h in source.holds()}
        return {(name, vm, p) for name, (vm, p, _target) in holds(source.path).items()}
    name = f"conformance-{uuid.uuid4().hex[:8]}"
    assert source.hold(name, "web", point_id, tmp_path / "target") is True
    try:
        assert (name, "web", point_id) in held()
        source.adopt_hold(name)
        assert source.point("web", point_id).id == point_id
    finally:
        source.release_hold(name)
    assert (name, "web", point_id) not in held()
    with pytest.raises(RpfsError):
        source.hold(name, "web", "2000-01-01T000000Z", tmp_path / "target")
    assert (name, "web", "2000-01-01T000000Z") not in held()


def test_isolated_and_reopened_by_name_read_the_same(source):
    point = source.point("web")
    key = source.map_key("web", point.id, "os")
    with source.isolated() as isolated:
        assert isolated.point_ids("web") == source.point_ids("web")
        assert isolated.block_map(key) == source.block_map(key)
    assert source.point_ids("web")   # still open: isolated() leaves the source as it was
    name = source.source_name()
    assert name.options() in (["--store", str(Path(source.path).absolute())], ["--vault", "offsite"])
    with open_for_daemon(name, source.master_key) as again:
        assert again.point_ids("web") == source.point_ids("web")
        assert again.block_digest(key, 0) == source.block_digest(key, 0)
