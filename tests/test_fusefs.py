"""The FUSE handlers called directly, without the kernel: names, attributes, reads and error mapping."""
import errno
import os
import stat
import threading

import pyfuse3
import pytest
import trio
from test_backup import corrupt_one_block, write_image

from rpfs.backup.pipeline import backup
from rpfs.serve.image import BlockCache
from rpfs.serve.store_tree import RecoveryPointFS
from rpfs.store.leases import gate, leased_points
from rpfs.store.store import Store

MiB = 1 << 20


@pytest.fixture
def fs(tmp_path):
    img = write_image(tmp_path / "d.img", 31, 3 * MiB + 100)
    with Store.init(tmp_path / "store") as store:
        point, _ = backup(store, "vm", [("d", str(img))])
        yield RecoveryPointFS(store, BlockCache(4 * MiB)), store, point, img.read_bytes()


def call(handler, *args):
    return trio.run(lambda: handler(*args))


def lookup_path(ops, *names):
    inode = pyfuse3.ROOT_INODE
    for name in names:
        inode = call(ops.lookup, inode, os.fsencode(name), None).st_ino
    return inode


def errno_of(handler, *args) -> int:
    with pytest.raises(pyfuse3.FUSEError) as err:
        call(handler, *args)
    return err.value.errno


def test_tree_and_attributes(fs):
    ops, _, point, data = fs
    image = lookup_path(ops, "vm", point.id, "d.img")
    attrs = call(ops.getattr, image, None)
    assert stat.S_ISREG(attrs.st_mode) and attrs.st_mode & 0o777 == 0o440   # root (and an allowed group) only
    assert attrs.st_size == len(data)
    latest = lookup_path(ops, "vm", "latest")
    assert stat.S_ISLNK(call(ops.getattr, latest, None).st_mode)
    assert call(ops.readlink, latest, None) == point.id.encode()
    assert stat.S_ISDIR(call(ops.getattr, lookup_path(ops, "vm", point.id), None).st_mode)
    assert [name for name, _ in ops._children(ops._node(lookup_path(ops, "vm")))] == [point.id, "latest"]


def test_unknown_names_are_enoent(fs):
    ops, _, point, _ = fs
    vm = lookup_path(ops, "vm")
    assert errno_of(ops.lookup, pyfuse3.ROOT_INODE, b"nosuchvm", None) == errno.ENOENT
    assert errno_of(ops.lookup, vm, b"2000-01-01T000000Z", None) == errno.ENOENT
    assert errno_of(ops.lookup, lookup_path(ops, "vm", point.id), b"other.img", None) == errno.ENOENT


def test_reads_across_blocks_and_past_the_end(fs):
    ops, _, point, data = fs
    image = lookup_path(ops, "vm", point.id, "d.img")
    fh = call(ops.open, image, os.O_RDONLY, None).fh
    for offset, size in [(0, 4096), (MiB - 10, 20), (MiB - 1, 2 * MiB + 2), (len(data) - 5, 100),
                         (len(data), 10), (len(data) + 5, 10)]:
        assert call(ops.read, fh, offset, size) == data[offset:offset + size]


def test_open_for_writing_is_refused(fs):
    ops, _, point, _ = fs
    image = lookup_path(ops, "vm", point.id, "d.img")
    assert errno_of(ops.open, image, os.O_RDWR, None) == errno.EROFS


def test_corrupt_block_is_eio(fs):
    ops, store, point, _ = fs
    digest = corrupt_one_block(store, point, "d")
    key = store.map_key("vm", point.id, "d")
    bad = next(i for i in range(point.disk("d").blocks) if store.block_digest(key, i) == digest)
    fh = call(ops.open, lookup_path(ops, "vm", point.id, "d.img"), os.O_RDONLY, None).fh
    assert errno_of(ops.read, fh, (bad + 1) * MiB - 4096, 4096) == errno.EIO   # the damaged (last) frame


def test_open_waits_for_a_prune_off_the_fuse_loop(tmp_path):
    """While a prune holds the gate, an open waits on a thread: the loop goes on answering (issue 9, defect 9)."""
    img = write_image(tmp_path / "d.img", 32, MiB)
    with Store.init(tmp_path / "store") as store:
        point, _ = backup(store, "vm", [("d", str(img))])
        lease = store.keeper()
        ops = RecoveryPointFS(store, BlockCache(4 * MiB), keeper=lease)
        image = lookup_path(ops, "vm", point.id, "d.img")
        held, release = threading.Event(), threading.Event()

        def prune_deleting():
            with gate(store.path, exclusive=True):
                held.set()
                release.wait(30)
        events = []

        async def main():
            async def open_image():
                await ops.open(image, os.O_RDONLY, None)
                events.append("opened")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_image)
                await trio.sleep(0.3)
                await ops.getattr(image, None)
                events.append("answered")
                release.set()
        holder = threading.Thread(target=prune_deleting)
        holder.start()
        try:
            held.wait(10)
            trio.run(main)
        finally:
            release.set()
            holder.join()
        try:
            assert events == ["answered", "opened"]
            assert ("vm", point.id) in leased_points(store.path)
        finally:
            lease.close()
