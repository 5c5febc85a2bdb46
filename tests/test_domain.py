"""libvirt domains: discovery of the disks to back up from real libvirt XML, the XML of a copy that defines
and runs beside the original, the connection's one-line errors, and restore as a new domain (rpfs restore
--to-libvirt). Real libvirtd and qemu; domains are defined (a few started: no OS, they sit in firmware)
and always destroyed and undefined."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid as uuid_module
from pathlib import Path

import pytest
from cli_helpers import open_store, rpfs

from rpfs.errors import RpfsError
from rpfs.vm import domain as vm_domain
from rpfs.vm import libvirt_host

libvirt = pytest.importorskip("libvirt")
MiB = 1 << 20


def _libvirt_up() -> None:
    try:
        libvirt_host.connect().close()
    except RpfsError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"libvirtd must run in CI: {e}")
        pytest.skip(str(e))


@pytest.fixture
def conn():
    """A connection; every domain a test defines through define() is destroyed and undefined after it."""
    _libvirt_up()
    connection = libvirt_host.connect()
    connection.rpfs_test_names = []
    try:
        yield connection
    finally:
        for name in connection.rpfs_test_names:
            _remove_domain(connection, name)
        connection.close()


def _remove_domain(connection, name: str) -> None:
    try:
        dom = connection.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def new_name(conn) -> str:
    name = f"rpfs-test-dom-{uuid_module.uuid4().hex[:8]}"
    conn.rpfs_test_names.append(name)
    return name


@pytest.fixture
def images():
    """A folder libvirt's qemu can reach (below /var/lib/libvirt/images), removed afterwards."""
    folder = Path(f"/var/lib/libvirt/images/rpfs-test-domain-{uuid_module.uuid4().hex[:8]}")
    folder.mkdir(mode=0o711, parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def loops():
    """Loop devices a test attaches: detached afterwards."""
    attached: list[str] = []
    try:
        yield attached
    finally:
        for loop in attached:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def random_image(path: Path, size: int = 4 * MiB, seed: int = 1) -> Path:
    """Data with a hole in the middle, so sparse restores and holes are exercised."""
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(size // 4))
        f.seek(size // 2)
        f.write(rng.randbytes(size // 4))
        f.truncate(size)
    return path


def disk_xml(kind: str, device: str, fmt: str, source: str, target: str, extra: str = "") -> str:
    return (f"<disk type='{kind}' device='{device}'><driver name='qemu' type='{fmt}'/>{source}"
            f"<target dev='{target}' bus='{'sata' if target.startswith('sd') else 'virtio'}'/>{extra}</disk>")


def domain_of(name: str, disks: str, extra_devices: str = "") -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"<os><type arch='x86_64'>hvm</type></os><devices>{disks}{extra_devices}</devices></domain>")


def define(conn, xml: str):
    dom = libvirt_host.define(conn, xml)
    if dom.name() not in conn.rpfs_test_names:
        conn.rpfs_test_names.append(dom.name())
    return dom


def test_discovery_sorts_every_kind_of_disk_on_real_libvirt_xml(conn, images, loops):
    raw = random_image(images / "raw.img")
    base = random_image(images / "base.img", seed=2)
    over = images / "over.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(over)],
                   check=True)
    block_file = random_image(images / "block.img", seed=3)
    loop = subprocess.run(["losetup", "--find", "--show", str(block_file)], capture_output=True, text=True,
                          check=True).stdout.strip()
    loops.append(loop)
    for name in ("ro.img", "shared.img", "excluded.img", "disk.vmdk"):
        random_image(images / name, seed=4)
    disks = "".join([
        disk_xml("file", "disk", "raw", f"<source file='{raw}'/>", "vda"),
        disk_xml("file", "disk", "qcow2", f"<source file='{over}'/>", "vdb"),
        disk_xml("block", "disk", "raw", f"<source dev='{loop}'/>", "vdc"),
        disk_xml("file", "cdrom", "raw", "", "sda", "<readonly/>"),
        disk_xml("file", "disk", "raw", f"<source file='{images / 'ro.img'}'/>", "vdd", "<readonly/>"),
        disk_xml("file", "disk", "raw", f"<source file='{images / 'shared.img'}'/>", "vde", "<shareable/>"),
        disk_xml("network", "disk", "raw",
                 "<source protocol='nbd' name='x'><host name='localhost' port='10809'/></source>", "vdf"),
        disk_xml("file", "disk", "raw", f"<source file='{images / 'excluded.img'}'/>", "vdg"),
        disk_xml("file", "disk", "vmdk", f"<source file='{images / 'disk.vmdk'}'/>", "vdh"),
    ])
    name = new_name(conn)
    dom = define(conn, domain_of(name, disks))
    xml = libvirt_host.domain_xml(dom, inactive=True)
    assert libvirt_host.state(dom) == "shut-off"
    assert vm_domain.name(xml) == name and vm_domain.uuid(xml) == dom.UUIDString()

    found = vm_domain.discover(xml, {"vdg"})

    assert [(d.target, d.type, d.path, d.format) for d in found.disks] == [
        ("vda", "file", str(raw), "raw"), ("vdb", "file", str(over), "qcow2"), ("vdc", "block", loop, "raw")]
    assert set(found.skipped) == {"sda", "vdd", "vde", "vdg"}
    assert "CD-ROM" in found.skipped["sda"] and "read-only" in found.skipped["vdd"]
    assert "shareable" in found.skipped["vde"] and "--exclude-disk" in found.skipped["vdg"]
    assert set(found.refused) == {"vdf", "vdh"}
    assert "network" in found.refused["vdf"] and "vmdk" in found.refused["vdh"]
    with pytest.raises(RpfsError, match="no such disk"):
        vm_domain.discover(xml, {"vdz"})

    copy = vm_domain.disks(vm_domain.new_domain_xml(xml, "rpfs-test-copy", {"vda": (raw, "qcow2")}))
    assert [(d.target, d.device, d.type, d.path, d.format) for d in copy] == [
        ("vda", "disk", "file", str(raw), "qcow2"), ("sda", "cdrom", "file", "", "raw")]
    with pytest.raises(RpfsError, match="no disk vdz"):
        vm_domain.new_domain_xml(xml, "rpfs-test-copy", {"vdz": (raw, "raw")})

    assert vm_domain.backing_chain(over, "qcow2") == [over, base]
    assert vm_domain.backing_chain(raw, "raw") == [raw]
    with pytest.raises(RpfsError, match="qemu-img cannot read"):
        vm_domain.backing_chain(raw, "qcow2")   # not a qcow2 file: qemu-img's one line


def test_domain_xml_from_elsewhere_is_refused_when_not_plain():
    with pytest.raises(RpfsError, match="DOCTYPE"):
        vm_domain.parse('<!DOCTYPE d [<!ENTITY a "aaaa">]><domain><name>&a;</name></domain>')
    with pytest.raises(RpfsError, match="more than"):
        vm_domain.parse("<domain>" + " " * vm_domain.XML_MAX_BYTES + "</domain>")
    with pytest.raises(RpfsError, match="not a libvirt domain"):
        vm_domain.parse("<network/>")
    with pytest.raises(RpfsError, match="does not parse"):
        vm_domain.parse("<domain>")


def test_disk_names_use_the_store_s_alphabet():
    from rpfs.store.recovery_point import NAME_RE
    assert vm_domain.DISK_NAME_RE.pattern == NAME_RE.pattern


def test_libvirtd_not_running_is_one_line_and_libvirt_prints_nothing(capfd):
    with pytest.raises(RpfsError) as refused:
        libvirt_host.connect("qemu:///system?socket=/nonexistent/libvirt-sock")
    assert refused.value.message == libvirt_host.NOT_RUNNING
    assert capfd.readouterr().err == ""


def test_an_unknown_domain_is_one_line_naming_the_known_ones(conn, capfd):
    name = new_name(conn)
    define(conn, domain_of(name, ""))
    with pytest.raises(RpfsError) as refused:
        libvirt_host.lookup(conn, "rpfs-test-no-such-domain\x1b[31m")
    message = refused.value.message
    assert "\n" not in message and "\x1b" not in message and "\\x1b" in message
    assert message.startswith("no libvirt domain rpfs-test-no-such-domain") and name in message
    assert capfd.readouterr().err == ""


def test_a_new_domain_defines_and_runs_beside_the_original(conn, images):
    """No name, UUID, MAC, socket, log, NVRAM or VNC port clash: both start (no OS: they sit in firmware)."""
    raw = random_image(images / "raw.img")
    qcow = images / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "4M"], check=True)
    iso = random_image(images / "cd.iso", size=MiB)
    original = new_name(conn)
    copy = new_name(conn)
    devices = (f"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
               f"<serial type='pty'><log file='/var/log/libvirt/qemu/{original}-serial.log'/></serial>"
               "<interface type='user'><model type='virtio'/></interface>"
               "<graphics type='vnc' port='5979' autoport='no'/>")
    disks = "".join([
        disk_xml("file", "disk", "raw", f"<source file='{raw}'/>", "vda"),
        disk_xml("file", "disk", "qcow2", f"<source file='{qcow}'/>", "vdb"),
        disk_xml("file", "cdrom", "raw", f"<source file='{iso}'/>", "sda", "<readonly/>"),
        disk_xml("file", "disk", "raw", f"<source file='{images / 'shared.img'}'/>", "vdc", "<shareable/>"),
    ])
    random_image(images / "shared.img", seed=7)
    first = define(conn, domain_of(original, disks, devices))
    xml = libvirt_host.domain_xml(first, inactive=True)
    restored_vda = shutil.copy(raw, images / f"{copy}-vda.img")
    restored_vdb = images / f"{copy}-vdb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(restored_vdb), "4M"], check=True)

    second = define(conn, vm_domain.new_domain_xml(xml, copy, {"vda": (Path(restored_vda), "raw"),
                                                               "vdb": (restored_vdb, "qcow2")}))

    new_xml = libvirt_host.domain_xml(second, inactive=True)
    assert second.UUIDString() != first.UUIDString()
    new_disks = {d.target: d for d in vm_domain.disks(new_xml)}
    assert set(new_disks) == {"vda", "vdb", "sda"}   # the shareable disk was not backed up: left out
    assert (new_disks["vda"].path, new_disks["vda"].format) == (str(restored_vda), "raw")
    assert (new_disks["vdb"].path, new_disks["vdb"].format) == (str(restored_vdb), "qcow2")
    assert new_disks["sda"].path == ""   # the CD-ROM drive stays, empty
    assert original not in new_xml
    assert libvirt_host.domain_xml(first, inactive=True) == xml
    started = []
    try:
        libvirt_host.start(first)
        started.append(first)
        libvirt_host.start(second)
        started.append(second)
        assert libvirt_host.state(first) == libvirt_host.state(second) == "running"
        macs = [ET_macs(libvirt_host.domain_xml(d)) for d in (first, second)]
        assert macs[0] and macs[1] and not set(macs[0]) & set(macs[1])
    finally:
        for dom in started:
            dom.destroy()


def ET_macs(xml: str) -> list[str]:
    return [m.get("address") for m in vm_domain.parse(xml).iterfind("devices/interface/mac")]


# --- restore as a new domain ---------------------------------------------------------------------------

@pytest.fixture
def vm_point(conn, images, tmp_path):
    """A VM-like point: disk images backed up with rpfs backup --disk, then the domain's XML set on it
    as a libvirt backup would (the real VM backup is another part of the work)."""
    original = new_name(conn)
    vda = random_image(images / "vda.img", seed=5)
    vdb = random_image(images / "vdb.img", size=2 * MiB, seed=6)
    disks = "".join([
        disk_xml("file", "disk", "raw", f"<source file='{vda}'/>", "vda"),
        disk_xml("file", "disk", "raw", f"<source file='{vdb}'/>", "vdb"),
        disk_xml("file", "cdrom", "raw", "", "sda", "<readonly/>"),
    ])
    dom = define(conn, domain_of(original, disks, "<interface type='user'><model type='virtio'/></interface>"))
    xml = libvirt_host.domain_xml(dom, inactive=True)
    store = tmp_path / "store"
    rpfs("init", store=store)
    point_id = json.loads(rpfs("backup", original, f"--disk=vda={vda}", f"--disk=vdb={vdb}", "--json",
                               store=store).stdout)["point_id"]

    def mark(point):
        point.libvirt = {"domain": original, "uuid": dom.UUIDString(), "state": "shut-off", "xml": xml,
                         "checkpoint": ""}
    with open_store(store) as opened:
        opened.modify_point(original, point_id, mark)
    return store, original, {"vda": vda, "vdb": vdb}, xml


def same_bytes(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def test_restore_as_a_new_domain(conn, vm_point, images, tmp_path):
    store, original, sources, original_xml = vm_point
    folder = tmp_path / "restored"
    folder.mkdir()
    copy = new_name(conn)

    out = json.loads(rpfs("restore", original, "--to-libvirt", copy, "--to", str(folder), "--json",
                          store=store).stdout)

    assert out["domain"] == copy and set(out["files"]) == {"vda", "vdb"}
    dom = libvirt_host.lookup(conn, copy)
    assert dom.UUIDString() == out["uuid"] != libvirt_host.lookup(conn, original).UUIDString()
    restored = {d.target: d for d in vm_domain.disks(libvirt_host.domain_xml(dom, inactive=True))}
    for target, source in sources.items():
        assert restored[target].path == str(folder / f"{copy}-{target}.img") == out["files"][target]
        assert restored[target].format == "raw"
        assert same_bytes(restored[target].path, source)
        assert os.stat(restored[target].path).st_mode & 0o777 == 0o600
    assert restored["sda"].device == "cdrom"
    assert libvirt_host.domain_xml(libvirt_host.lookup(conn, original), inactive=True) == original_xml
    assert sorted(p.name for p in folder.iterdir()) == [f"{copy}-vda.img", f"{copy}-vdb.img"]

    again = rpfs("restore", original, "--to-libvirt", copy, "--to", str(tmp_path / "restored"), store=store,
                 check=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    other = tmp_path / "other"
    other.mkdir()
    taken = rpfs("restore", original, "--to-libvirt", original, "--to", str(other), store=store, check=False)
    assert taken.returncode == 1 and f"a libvirt domain {original} already exists" in taken.stderr
    assert list(other.iterdir()) == []


def test_restore_as_a_new_domain_in_qcow2(conn, vm_point, tmp_path):
    store, original, sources, _ = vm_point
    folder = tmp_path / "restored"
    folder.mkdir()
    copy = new_name(conn)
    rpfs("restore", original, "--to-libvirt", copy, "--to", str(folder), "--format", "qcow2", store=store)
    restored = {d.target: d for d in vm_domain.disks(
        libvirt_host.domain_xml(libvirt_host.lookup(conn, copy), inactive=True))}
    for target, source in sources.items():
        assert restored[target].format == "qcow2"
        as_raw = tmp_path / f"{target}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", restored[target].path, str(as_raw)],
                       check=True)
        assert same_bytes(as_raw, source)
    assert sorted(p.name for p in folder.iterdir()) == [f"{copy}-vda.qcow2", f"{copy}-vdb.qcow2"]


def test_a_point_without_libvirt_xml_is_refused(tmp_path):
    disk = random_image(tmp_path / "disk.img")
    store = tmp_path / "store"
    rpfs("init", store=store)
    rpfs("backup", "plain", f"--disk=vda={disk}", store=store)
    (tmp_path / "out").mkdir()
    refused = rpfs("restore", "plain", "--to-libvirt", "rpfs-test-never", "--to", str(tmp_path / "out"),
                   store=store, check=False)
    assert refused.returncode == 1
    assert "was not taken of a libvirt domain: restore its disks with --to" in refused.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_killed_restore_as_a_domain_finishes_when_run_again(conn, vm_point, tmp_path):
    """Killed after one disk was whole and before the domain was defined: the same command finishes,
    keeping the whole file; another point or format into the same names is refused."""
    from rpfs.restore.as_vm import plan_restore_as_vm, record_path
    from rpfs.restore.full import restore_disk
    from rpfs.host.files import create_whole
    from dataclasses import asdict
    store, original, sources, _ = vm_point
    folder = tmp_path / "restored"
    folder.mkdir()
    copy = new_name(conn)
    with open_store(store) as opened:
        point = opened.point(original, None)
        plan = plan_restore_as_vm(point, copy, folder)
        create_whole(record_path(folder, copy), json.dumps(asdict(plan)).encode())
        restore_disk(opened, point, "vda", Path(plan.files["vda"]))
    first_inode = os.stat(plan.files["vda"]).st_ino

    other = rpfs("restore", original, "--to-libvirt", copy, "--to", str(folder), "--format", "qcow2",
                 store=store, check=False)
    assert other.returncode == 1 and "unfinished restore" in other.stderr
    rpfs("restore", original, "--to-libvirt", copy, "--to", str(folder), store=store)

    assert os.stat(plan.files["vda"]).st_ino == first_inode   # whole: kept, not written twice
    for target, source in sources.items():
        assert same_bytes(plan.files[target], source)
    assert not record_path(folder, copy).exists()
    assert libvirt_host.exists(conn, copy)


def test_restore_as_a_new_domain_with_instant_images(conn, vm_point, tmp_path):
    store, original, sources, _ = vm_point
    folder = tmp_path / "restored"
    folder.mkdir()
    copy = new_name(conn)
    out = None
    try:
        out = json.loads(rpfs("restore", original, "--to-libvirt", copy, "--to", str(folder), "--instant",
                              "--json", store=store).stdout)
        restored = {d.target: d for d in vm_domain.disks(
            libvirt_host.domain_xml(libvirt_host.lookup(conn, copy), inactive=True))}
        for target, source in sources.items():
            device = out["disks"][target]
            assert restored[target].type == "block" and restored[target].path == device
            backing = subprocess.run(["losetup", "--noheadings", "-O", "BACK-FILE", device], capture_output=True,
                                     text=True, check=True).stdout.strip()
            assert backing.endswith(f"/{target}.img") and str(tmp_path / "run") in backing
            assert same_bytes(device, source)
        dom = libvirt_host.lookup(conn, copy)
        libvirt_host.start(dom)   # libvirt's qemu, as its own user, opens the loop devices (no OS: firmware)
        assert libvirt_host.state(dom) == "running"
    finally:
        if libvirt_host.exists(conn, copy):
            _remove_domain(conn, copy)
        for device in (out or {}).get("disks", {}).values():
            subprocess.run(["losetup", "-d", device], capture_output=True)
        for target in sources:
            rpfs("instant-stop", "--discard", str(folder / f"{copy}-{target}.img"), store=store, check=False)
