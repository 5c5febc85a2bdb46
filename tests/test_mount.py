"""The FUSE mount, on the real kernel: exact bytes, holes, corruption, live updates, daemon life."""
import errno
import json
import os
import random
import signal
import threading
from pathlib import Path

import pytest
from cli_helpers import is_mounted, mounted, open_store, rpfs
from diskimages import random_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_backup import corrupt_one_block, write_image


MiB = 1 << 20
pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("kernel")]


@pytest.fixture
def vm(tmp_path):
    """A store holding one VM with an odd-sized, a sparse and an empty disk."""
    disks = {
        "odd": write_image(tmp_path / "odd.img", 11, 5 * MiB + 12345),
        "sparse": tmp_path / "sparse.img",
        "empty": tmp_path / "empty.img",
    }
    with open(disks["sparse"], "wb") as f:
        f.truncate(512 * MiB)
        f.seek(100 * MiB + 3)
        f.write(os.urandom(70000))
    disks["empty"].touch()
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm1", *[f"--disk={n}={p}" for n, p in disks.items()], store=store)
    return store, disks


def test_images_read_back_identical(vm, tmp_path):
    store, disks = vm
    with mounted(store, tmp_path / "mnt") as mnt:
        assert os.listdir(mnt) == ["vm1"]
        entries = sorted(os.listdir(mnt / "vm1"))
        assert entries[-1] == "latest" and len(entries) == 2
        point_dir = mnt / "vm1" / entries[0]
        assert os.readlink(mnt / "vm1" / "latest") == entries[0]
        assert sorted(os.listdir(point_dir)) == ["empty.img", "info.json", "odd.img", "sparse.img"]
        assert json.loads((point_dir / "info.json").read_text())["consistency"] == "crash"
        for name, source in disks.items():
            image = point_dir / f"{name}.img"
            assert image.stat().st_size == source.stat().st_size
            assert image.read_bytes() == source.read_bytes(), name
    assert not is_mounted(tmp_path / "mnt")


def test_du_and_a_sparse_cp_of_an_image_see_its_holes(vm, tmp_path):
    """What the admin did: `du` of the VM in the mount shows what is stored, not 512 MiB per sparse image;
    `cp --sparse=auto` of latest/sparse.img writes a sparse copy with the same bytes."""
    import subprocess
    store, disks = vm
    with mounted(store, tmp_path / "mnt") as mnt:
        du = int(subprocess.run(["du", "-sk", str(mnt / "vm1")], capture_output=True, text=True,
                                check=True).stdout.split()[0])
        assert du < 8 * 1024   # 5 MiB of odd data and 70 KB of sparse data, stored: not 517 MiB
        image = mnt / "vm1" / "latest" / "sparse.img"
        assert image.stat().st_size == 512 * MiB and image.stat().st_blocks * 512 < 1 * MiB
        copy = tmp_path / "copy.img"
        subprocess.run(["cp", "--sparse=auto", str(image), str(copy)], check=True)
    assert copy.stat().st_blocks * 512 < 4 * MiB and copy.read_bytes() == disks["sparse"].read_bytes()


def test_a_busy_unmount_names_the_process_holding_an_image(vm, tmp_path):
    """What the admin met: umount while a program has an image open says which program, by pid."""
    import subprocess
    store, _ = vm
    with mounted(store, tmp_path / "mnt") as mnt:
        image = mnt / "vm1" / "latest" / "odd.img"
        holder = subprocess.Popen(["bash", "-c", 'exec 3<"$1"; echo ready; exec sleep 60', "-", str(image)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "ready\n"
            busy = rpfs("umount", str(mnt), check=False)
            assert busy.returncode == 1 and busy.stderr.count("\n") == 1, busy.stderr
            assert f"busy: used by sleep (pid {holder.pid})" in busy.stderr, busy.stderr
        finally:
            holder.kill()
            holder.wait()
        rpfs("umount", str(mnt))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(offset=st.integers(0, 5 * MiB + 20000), length=st.integers(0, 2 * MiB))
def test_random_reads_through_mount(offset, length, mounted_vm):
    mnt, disks = mounted_vm
    fd = os.open(mnt / "vm1" / "latest" / "odd.img", os.O_RDONLY)
    try:
        got = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    with open(disks["odd"], "rb") as f:
        f.seek(offset)
        assert got == f.read(length)


@pytest.fixture(scope="module")
def mounted_vm(tmp_path_factory):
    from conftest import require_kernel
    require_kernel()
    tmp = tmp_path_factory.mktemp("mv")
    disks = {"odd": write_image(tmp / "odd.img", 12, 5 * MiB + 12345)}
    store = tmp / "store"
    rpfs("init", "--block-size", "256K", store=store)
    rpfs("backup", "vm1", f"--disk=odd={disks['odd']}", store=store)
    with mounted(store, tmp / "mnt") as mnt:
        yield mnt, disks


def test_concurrent_readers(vm, tmp_path):
    store, disks = vm
    source = disks["odd"].read_bytes()
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        fd = os.open(mnt / "vm1" / "latest" / "odd.img", os.O_RDONLY)
        try:
            for _ in range(100):
                off, n = rnd.randrange(len(source)), rnd.randrange(1, 300000)
                if os.pread(fd, n, off) != source[off:off + n]:
                    errors.append((off, n))
        finally:
            os.close(fd)

    with mounted(store, tmp_path / "mnt", "--cache-mb", "1") as mnt:
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_corrupt_block_reads_as_eio(tmp_path):
    img = write_image(tmp_path / "d.img", 13, 3 * MiB)
    store_dir = tmp_path / "store"
    rpfs("init", store=store_dir)
    rpfs("backup", "vm", f"--disk=d={img}", store=store_dir)
    with open_store(store_dir) as store:
        point = store.point("vm")
        bad_digest = corrupt_one_block(store, point, "d")
        key = store.map_key("vm", point.id, "d")
        bad = [i for i in range(point.disk("d").blocks) if store.block_digest(key, i) == bad_digest]
    with mounted(store_dir, tmp_path / "mnt") as mnt:
        fd = os.open(mnt / "vm" / "latest" / "d.img", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as err:   # the damaged byte is in the block's last frame
                os.pread(fd, 4096, (bad[0] + 1) * MiB - 4096)
            assert err.value.errno == errno.EIO
            good = [i for i in range(3) if i not in bad]
            source = img.read_bytes()
            for i in good:
                assert os.pread(fd, MiB, i * MiB) == source[i * MiB:(i + 1) * MiB]
        finally:
            os.close(fd)


def test_new_recovery_points_appear_while_mounted(vm, tmp_path):
    store, disks = vm
    with mounted(store, tmp_path / "mnt") as mnt:
        first = os.readlink(mnt / "vm1" / "latest")
        with open(disks["odd"], "r+b") as f:
            f.write(b"changed")
        rpfs("backup", "vm1", f"--disk=odd={disks['odd']}", store=store)
        rpfs("backup", "vm2", f"--disk=odd={disks['odd']}", store=store)
        assert sorted(os.listdir(mnt)) == ["vm1", "vm2"]
        points = sorted(p for p in os.listdir(mnt / "vm1") if p != "latest")
        assert len(points) == 2 and points[0] == first
        assert os.readlink(mnt / "vm1" / "latest") == points[1]
        assert (mnt / "vm1" / "latest" / "odd.img").read_bytes() == disks["odd"].read_bytes()
        assert not (mnt / "vm1" / "latest" / "sparse.img").exists()


def test_umount_cleans_up_after_a_dead_daemon(vm, tmp_path):
    store, _ = vm
    with mounted(store, tmp_path / "mnt") as mnt, mounted(store, tmp_path / "mnt2") as doomed:
        os.kill(_daemon_pid(doomed), signal.SIGKILL)
        with pytest.raises(OSError):
            os.listdir(doomed)
        rpfs("umount", str(doomed))
        assert not is_mounted(doomed)
        assert os.listdir(mnt) == ["vm1"]  # the other mount is untouched


def test_mount_errors(vm, tmp_path):
    store, disks = vm
    cases = [
        (["mount", str(tmp_path / "missing")], "does not exist"),
        (["mount", str(disks["odd"])], "not a directory"),
    ]
    for args, message in cases:
        done = rpfs(*args, store=store, check=False)
        assert done.returncode != 0 and message in done.stderr and done.stderr.count("\n") == 1
    (tmp_path / "empty-dir").mkdir()
    done = rpfs("mount", str(tmp_path / "mnt"), store=tmp_path / "empty-dir", check=False)
    assert done.returncode != 0 and "not an rpfs store" in done.stderr
    with mounted(store, tmp_path / "mnt") as mnt:
        done = rpfs("mount", str(mnt), store=store, check=False)
        assert done.returncode != 0 and "busy" in done.stderr
    done = rpfs("umount", str(tmp_path / "mnt"), check=False)
    assert done.returncode != 0 and "not mounted" in done.stderr


def test_daemon_memory_stays_bounded(tmp_path):
    img = random_disk(tmp_path / "big.img", 384)
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={img}", store=store)
    with mounted(store, tmp_path / "mnt", "--cache-mb", "16") as mnt:
        pid = _daemon_pid(mnt)
        with open(mnt / "vm" / "latest" / "d.img", "rb") as f:
            while f.read(4 * MiB):
                pass
        # Anonymous memory only: LMDB's mapped file pages are page cache, shared and reclaimable.
        status = Path(f"/proc/{pid}/status").read_text()
        anon_kib = int(status.split("RssAnon:")[1].split()[0])
    assert anon_kib < 100 * 1024, f"daemon RssAnon {anon_kib} KiB after reading 384 MiB with a 16 MiB cache"


def test_a_crashed_store_reader_costs_a_read_not_the_mount(tmp_path):
    """LMDB can crash the process reading a damaged page (SIGBUS): the daemon's reads run in reader
    processes, so such a crash fails one read with EIO, and the mount serves on with new readers."""
    img = random_disk(tmp_path / "d.img", 24)
    source = img.read_bytes()
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "vm", f"--disk=d={img}", store=store)
    with mounted(store, tmp_path / "mnt", "--cache-mb", "1") as mnt:
        pid = _daemon_pid(mnt)
        image = mnt / "vm" / "latest" / "d.img"
        assert image.read_bytes() == source
        readers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert readers, "the daemon reads the store itself"
        for reader in readers:
            os.kill(reader, signal.SIGBUS)
        failed = 0
        for index in range(24):   # each read (its lookup and open too): the right bytes or EIO
            try:
                with open(image, "rb", buffering=0) as f:
                    assert os.pread(f.fileno(), MiB, index * MiB) == source[index * MiB:(index + 1) * MiB]
            except OSError as e:
                assert e.errno == errno.EIO
                failed += 1
        assert failed <= len(readers)
        assert image.read_bytes() == source and _daemon_pid(mnt) == pid and os.listdir(mnt) == ["vm"]
        assert not any(Path(f"/proc/{reader}").exists() for reader in readers), "a dead reader was never noticed"


def _daemon_pid(mountpoint: Path) -> int:
    from rpfs.host.run_dir import daemon_files
    return int(daemon_files(Path(os.path.realpath(mountpoint)))[0].read_text())
