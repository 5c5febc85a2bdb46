"""rpfs/vm/backup_job.py on real libvirt and qemu: a pull backup's export is the disk at begin(), an
incremental's bitmap is exactly the writes since the previous checkpoint, bitmaps never accumulate, broken
chains (qemu killed -9, a checkpoint deleted by hand, the domain redefined, a disk replaced) give a full job
with the reason, and a job left by a killed rpfs is aborted by the next begin.

The domain needs no guest OS: TCG, 256 MiB, a 64 MiB qcow2 vda and nothing to boot (it sits in firmware).
The tests write to its disk from the host side through qemu (HMP qemu-io on the guest's device), so the
bitmaps see the writes as they would see the guest's. Run under `flock /tmp/rpfs-libvirt.lock`."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from rpfs.errors import RpfsError
from tests.conftest import skip_or_fail_in_ci

libvirt = pytest.importorskip("libvirt")
from rpfs.vm import backup_job  # noqa: E402
from rpfs.vm.backup_job import ChainState, DiskIdentity  # noqa: E402

MiB = 1 << 20
DISK_SIZE = 64 * MiB
GRANULE = 64 * 1024   # the bitmaps' granularity: qcow2's cluster size
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"   # qemu-io -d: the device's block backend


# -- logic, no libvirt


def test_broken_chain_reasons():
    now = ChainState("u1", {"vda": DiskIdentity("/a.qcow2", DISK_SIZE)})
    assert backup_job.broken_chain_reason(now, now, "rpfs-1", ["rpfs-1"]) is None
    assert backup_job.broken_chain_reason(now, None, "rpfs-1", ["rpfs-1"]) is None
    assert "missing" in backup_job.broken_chain_reason(now, now, "rpfs-1", ["rpfs-0"])
    assert "UUID changed" in backup_job.broken_chain_reason(now, ChainState("u0", now.disks), "rpfs-1", ["rpfs-1"])
    moved = ChainState("u1", {"vda": DiskIdentity("/b.qcow2", DISK_SIZE)})
    assert "replaced" in backup_job.broken_chain_reason(now, moved, "rpfs-1", ["rpfs-1"])
    grown = ChainState("u1", {"vda": DiskIdentity("/a.qcow2", DISK_SIZE // 2)})
    assert "size" in backup_job.broken_chain_reason(now, grown, "rpfs-1", ["rpfs-1"])
    assert "new" in backup_job.broken_chain_reason(now, ChainState("u1", {}), "rpfs-1", ["rpfs-1"])


# -- the domain


class Guestless:
    """A started domain and what its disk holds, as the tests wrote it."""

    def __init__(self, conn, name: str, folder: Path):
        self.conn, self.name, self.folder = conn, name, folder
        self.image = folder / "vda.qcow2"
        self.expected = bytearray(DISK_SIZE)
        self.run = folder / "run"

    @property
    def dom(self):
        return self.conn.lookupByName(self.name)

    def write(self, offset: int, length: int, pattern: int) -> None:
        """A write through the guest's device, as the guest would make it."""
        out = _virsh("qemu-monitor-command", self.name, "--hmp",
                     f'qemu-io -d {DEVICE} "write -P {pattern:#x} {offset} {length}"')
        assert out.strip() == "", out   # qemu-io says nothing when the write went through
        self.expected[offset:offset + length] = bytes([pattern]) * length

    def bitmaps(self) -> set[str]:
        answer = json.loads(_virsh("qemu-monitor-command", self.name,
                                   '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'))
        return {b["name"] for node in answer["return"] for b in node.get("dirty-bitmaps") or []}

    def kill_qemu(self) -> None:
        pid = int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not self.dom.isActive(), "the domain to stop after its qemu was killed")

    def state(self) -> ChainState:
        return backup_job.chain_state(self.dom, ["vda"])


def _virsh(*args: str) -> str:
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def conn():
    if os.geteuid() != 0 or shutil.which("qemu-img") is None:
        skip_or_fail_in_ci("needs root and qemu-utils (run tools/setup)")
    try:
        connection = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        skip_or_fail_in_ci("needs libvirtd running (virtlogd -d; libvirtd -d)")
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def defined(conn):
    """One domain for the module (defining one took libvirtd 40-75 s here), started afresh per test."""
    name = f"rpfs-test-job-{uuidlib.uuid4().hex[:8]}"
    folder = Path(f"/var/lib/libvirt/images/{name}")
    folder.mkdir(mode=0o711)
    os.chmod(folder, 0o711)
    domain = None
    try:
        domain = conn.defineXML(f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{folder}/vda.qcow2'/>
<target dev='vda' bus='virtio'/></disk><video><model type='none'/></video><memballoon model='none'/>
</devices></domain>""")
        yield name, folder
    finally:
        if domain is not None:
            try:
                if domain.isActive():
                    domain.destroy()
            finally:
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        shutil.rmtree(folder)


@pytest.fixture
def vm(conn, defined):
    """The domain started on a new disk (data written before start), no checkpoints; stopped after."""
    name, folder = defined
    test = Guestless(conn, name, folder)
    for checkpoint in test.dom.listAllCheckpoints():
        checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    shutil.rmtree(test.run, ignore_errors=True)
    test.image.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(test.image), str(DISK_SIZE)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 2M", str(test.image)], check=True, capture_output=True)
    test.expected[0:2 * MiB] = b"\x11" * (2 * MiB)
    test.dom.create()
    try:
        yield test
    finally:
        if test.dom.isActive():
            test.dom.destroy()


def _read_export(job, target: str, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"nbd+unix:///{job.export(target)}?socket={job.socket}", str(out)], check=True, timeout=120)
    data = out.read_bytes()
    out.unlink()
    return data


def _dirty_extents(job, target: str) -> list[tuple[int, int]]:
    """(offset, length) of the changed extents: qemu-img map reports them "data": false through the
    dirty-bitmap context (qemu's NBD server sends them as NBD_STATE_HOLE)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                          f"driver=nbd,server.type=unix,server.path={job.socket},export={job.export(target)},"
                          f"x-dirty-bitmap={job.bitmap_context(target)}"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


def _nothing_left(test: Guestless) -> None:
    assert backup_job._backup_job_socket(test.dom) is None
    assert backup_job.leftovers(test.run) == []
    assert [p.name for p in test.run.iterdir() if not p.name.endswith(".lock")] == []


# -- real libvirt


def test_full_export_is_the_disk_at_begin_and_later_writes_stay_out(vm, tmp_path):
    vm.write(4 * MiB, 64 * 1024, 0x22)
    at_begin = bytes(vm.expected)
    with backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run) as job:
        assert job.full_reason is None and job.incremental_from is None and job.bitmap_context("vda") is None
        assert Path(job.socket).parent.stat().st_uid != 0   # qemu's own folder: it bound the socket there
        assert oct(vm.run.stat().st_mode & 0o777) == "0o711"
        vm.write(0, 64 * 1024, 0x33)   # after begin: the export keeps the old bytes
        vm.write(4 * MiB, 4096, 0x44)
        assert _read_export(job, "vda", tmp_path / "vda.raw") == at_begin
    _nothing_left(vm)
    assert backup_job.checkpoints(vm.dom) == ["rpfs-1"]


def test_incremental_bitmap_is_exactly_the_writes_since_the_checkpoint(vm, tmp_path):
    with backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run) as first:
        chain = first.chain
    vm.write(1 * MiB, 64 * 1024, 0x55)
    vm.write(5 * MiB + 4096, 8192, 0x66)   # inside one granule
    vm.write(20 * MiB, 3 * 64 * 1024, 0x77)
    with backup_job.begin(vm.dom, ["vda"], "rpfs-2", "rpfs-1", vm.run, previous=chain) as job:
        assert job.full_reason is None and job.incremental_from == "rpfs-1"
        assert job.bitmap_context("vda") == "qemu:dirty-bitmap:backup-vda"
        vm.write(30 * MiB, 64 * 1024, 0x88)   # after begin: in the next checkpoint, not this bitmap
        assert _dirty_extents(job, "vda") == [(1 * MiB, GRANULE), (5 * MiB, GRANULE), (20 * MiB, 3 * GRANULE)]
        data = _read_export(job, "vda", tmp_path / "vda.raw")
        assert data[:30 * MiB] == bytes(vm.expected[:30 * MiB]) and data[30 * MiB:30 * MiB + 4] == b"\0" * 4
    with backup_job.begin(vm.dom, ["vda"], "rpfs-3", "rpfs-2", vm.run, previous=job.chain) as third:
        assert _dirty_extents(third, "vda") == [(30 * MiB, GRANULE)]
    _nothing_left(vm)


def test_checkpoints_no_point_needs_are_deleted_and_bitmaps_do_not_accumulate(vm):
    previous, chain = None, None
    for n in range(1, 5):
        with backup_job.begin(vm.dom, ["vda"], f"rpfs-{n}", previous, vm.run, previous=chain) as job:
            assert job.full_reason is None
            chain = job.chain
        vm.write(n * MiB, 4096, n)
        assert backup_job.delete_checkpoints(vm.dom, keep={f"rpfs-{n}"}) == []
        previous = f"rpfs-{n}"
        assert backup_job.checkpoints(vm.dom) == [f"rpfs-{n}"]
        assert vm.bitmaps() == {f"rpfs-{n}"}
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>theirs</name></domaincheckpoint>", 0)
    backup_job.delete_checkpoints(vm.dom, keep=set())   # only rpfs's own
    assert backup_job.checkpoints(vm.dom) == [] and vm.bitmaps() == {"theirs"}


def test_qemu_killed_gives_a_full_job_with_the_reason_then_incremental_again(vm, tmp_path):
    with backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run) as job:
        chain = job.chain
    vm.write(3 * MiB, 4096, 0x21)
    vm.kill_qemu()
    vm.dom.create()
    with backup_job.begin(vm.dom, ["vda"], "rpfs-2", "rpfs-1", vm.run, previous=chain) as job:
        assert job.incremental_from is None and job.bitmap_context("vda") is None
        assert "inconsistent" in job.full_reason and "\n" not in job.full_reason
        assert _read_export(job, "vda", tmp_path / "vda.raw") == bytes(vm.expected)
        chain = job.chain
    assert backup_job.checkpoints(vm.dom) == ["rpfs-2"] and vm.bitmaps() == {"rpfs-2"}
    vm.write(7 * MiB, 4096, 0x31)
    with backup_job.begin(vm.dom, ["vda"], "rpfs-3", "rpfs-2", vm.run, previous=chain) as job:
        assert job.full_reason is None and job.incremental_from == "rpfs-2"
        assert _dirty_extents(job, "vda") == [(7 * MiB, GRANULE)]
    _nothing_left(vm)


def test_bitmaps_stored_in_use_by_a_killed_qemu_do_not_accumulate(vm):
    """A clean stop stores the bitmaps in the qcow2; the qemu started next marks them in use there and, killed,
    leaves them so: the next qemu loads them inconsistent. The full job's clean-up removes them too."""
    with backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run) as job:
        chain = job.chain
    vm.dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)   # qemu closes its images: bitmaps stored
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(vm.image)],
                                     check=True, capture_output=True, text=True).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["rpfs-1"]
    vm.dom.create()
    vm.write(3 * MiB, 4096, 0x21)
    vm.kill_qemu()
    vm.dom.create()
    assert vm.bitmaps() == {"rpfs-1"}   # loaded, inconsistent
    with backup_job.begin(vm.dom, ["vda"], "rpfs-2", "rpfs-1", vm.run, previous=chain) as job:
        assert job.incremental_from is None and "inconsistent" in job.full_reason
    assert backup_job.checkpoints(vm.dom) == ["rpfs-2"] and vm.bitmaps() == {"rpfs-2"}


def test_checkpoint_deleted_by_hand_or_domain_changed_gives_a_full_job(vm):
    with backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run) as job:
        chain = job.chain
    _virsh("checkpoint-delete", vm.name, "rpfs-1")
    with backup_job.begin(vm.dom, ["vda"], "rpfs-2", "rpfs-1", vm.run, previous=chain) as job:
        assert job.incremental_from is None and "rpfs-1 is missing" in job.full_reason
    redefined = ChainState(str(uuidlib.uuid4()), chain.disks)
    with backup_job.begin(vm.dom, ["vda"], "rpfs-3", "rpfs-2", vm.run, previous=redefined) as job:
        assert job.incremental_from is None and "UUID changed" in job.full_reason
    replaced = ChainState(chain.uuid, {"vda": DiskIdentity("/elsewhere/vda.qcow2", DISK_SIZE)})
    with backup_job.begin(vm.dom, ["vda"], "rpfs-4", "rpfs-3", vm.run, previous=replaced) as job:
        assert job.incremental_from is None and "replaced" in job.full_reason
    assert backup_job.checkpoints(vm.dom) == ["rpfs-4"] and vm.bitmaps() == {"rpfs-4"}
    _nothing_left(vm)


CHILD = """
import sys, time, libvirt
from pathlib import Path
from rpfs.vm import backup_job
dom = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
job = backup_job.begin(dom, ["vda"], "rpfs-1", None, Path(sys.argv[2]))
print(job.socket, flush=True)
time.sleep(600)
"""


def test_a_job_left_by_a_killed_rpfs_is_aborted_by_the_next_begin(vm, tmp_path):
    child = subprocess.Popen([sys.executable, "-I", "-c", CHILD, vm.name, str(vm.run)], cwd="/",
                             stdout=subprocess.PIPE, text=True)
    try:
        socket = child.stdout.readline().strip()
        assert socket and os.path.exists(socket)
        assert backup_job.leftovers(vm.run) == []   # its rpfs holds the lock: not a leftover
        with pytest.raises(RpfsError, match="is running"):
            backup_job.begin(vm.dom, ["vda"], "rpfs-2", None, vm.run)
    finally:
        child.kill()
        child.wait()
    assert backup_job._backup_job_socket(vm.dom) == socket   # the job stays on the domain
    assert backup_job.leftovers(vm.run) == [str(Path(socket).parent.parent)]
    vm.write(2 * MiB, 4096, 0x42)
    with backup_job.begin(vm.dom, ["vda"], "rpfs-2", "rpfs-1", vm.run) as job:
        assert job.full_reason is None
        assert _dirty_extents(job, "vda") == [(2 * MiB, GRANULE)]
    _nothing_left(vm)


def test_a_backup_run_again_in_the_second_a_killed_one_began_reuses_its_checkpoint_name(vm):
    """Point ids are times to the second: the killed rpfs's checkpoint (its point never made) has the name the
    run again asks for; begin deletes it rather than failing with "domain moment ... already exists"."""
    child = subprocess.Popen([sys.executable, "-I", "-c", CHILD, vm.name, str(vm.run)], cwd="/",
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip()
    finally:
        child.kill()
        child.wait()
    assert backup_job.checkpoints(vm.dom) == ["rpfs-1"]
    with backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run) as job:
        assert job.full_reason is None and job.incremental_from is None
    assert backup_job.checkpoints(vm.dom) == ["rpfs-1"] and vm.bitmaps() == {"rpfs-1"}
    _nothing_left(vm)


def test_clean_removes_what_a_killed_rpfs_left(vm):
    child = subprocess.Popen([sys.executable, "-I", "-c", CHILD, vm.name, str(vm.run)], cwd="/",
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip()
    finally:
        child.kill()
        child.wait()
    done = backup_job.clean(vm.conn, vm.run)
    assert any("aborted" in line for line in done) and any("removed" in line for line in done)
    _nothing_left(vm)


def test_a_backup_job_rpfs_did_not_start_is_refused(vm, tmp_path):
    other = vm.folder / "other"
    other.mkdir()
    os.chown(other, pwd.getpwnam("libvirt-qemu").pw_uid, pwd.getpwnam("libvirt-qemu").pw_gid)
    vm.dom.backupBegin(f"<domainbackup mode='pull'><server transport='unix' socket='{other}/s'/><disks>"
                       f"<disk name='vda' backup='yes' type='file'><scratch file='{vm.folder}/sc.qcow2'/></disk>"
                       "</disks></domainbackup>", None, 0)
    try:
        with pytest.raises(RpfsError, match="did not start"):
            backup_job.begin(vm.dom, ["vda"], "rpfs-1", None, vm.run)
    finally:
        vm.dom.abortJob()
