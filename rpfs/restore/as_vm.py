"""Restore a libvirt domain's recovery point as a new domain: its disks restored into a folder, then the
domain defined from the point's XML with a new name, UUID and MAC addresses. The original is never touched.

Order, so that a kill at any moment leaves what running the same command again finishes:
1. everything is checked before anything is written (the name is free in libvirt, the point has XML,
   the folder is there, no target file is there);
2. a record FOLDER/.NAME.rpfs-vm-restore (vm, point, format, the files) is created: it says the files
   under those names are this restore's;
3. each disk is restored by the full restore, which writes a partial file and gives it its final name
   only when whole (restore/partial.py); qcow2: the raw image is restored whole first, converted into a
   partial file renamed when whole, then the raw one is removed. Instant: the instant restore's own
   protocol (a resumable writable image);
4. the domain is defined (last), then the record is removed.
Run again after a kill, the record lets the whole files of that same point stay as they are (a file
under its final name is whole, by the protocol), and the rest is done. Without the record, or with one
of another point or format, an existing file is refused: rpfs never takes over a file it did not write.
"""
from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place
from rpfs.host.files import create_whole, fsync_folder
from rpfs.host.tools import run_tool
from rpfs.host.untrusted import parse_json
from rpfs.restore.full import ProgressFn, check_target, restore_disk
from rpfs.restore.partial import partial_path, refuse_link
from rpfs.store.recovery_point import RecoveryPoint, check_name
from rpfs.store.source import RecoverySource
from rpfs.vm import domain as domain_xml
from rpfs.vm import libvirt_host

FORMATS = ("raw", "qcow2")
RECORD_SUFFIX = ".rpfs-vm-restore"
RAW_SUFFIX = ".rpfs-raw"   # a qcow2 restore's raw image, whole, before it is converted
ProgressFactory = Callable[[str], AbstractContextManager[ProgressFn]]


@dataclass
class VmRestorePlan:
    """What restore_as_vm will do, checked: nothing is written yet."""
    vm: str
    point_id: str
    domain: str
    folder: str
    format: str
    instant: bool
    files: dict[str, str]                       # target (vda...) -> the disk's file
    resumed: bool = False                       # a killed run of the same restore is being finished


@dataclass
class VmRestored:
    domain: str
    uuid: str
    vm: str
    point_id: str
    format: str
    instant: bool
    files: dict[str, str]                       # target -> the restored file (instant: where the copy ends)
    disks: dict[str, str] = field(default_factory=dict)   # target -> what the domain's disk is (instant: a loop
                                                          # device over the writable image)
    started: bool = False


def record_path(folder: Path, new_name: str) -> Path:
    return folder / f".{new_name}{RECORD_SUFFIX}"


def plan_restore_as_vm(point: RecoveryPoint, new_name: str, folder: Path, fmt: str = "raw",
                       instant: bool = False, uri: str = libvirt_host.DEFAULT_URI) -> VmRestorePlan:
    """Check everything a restore as a new domain needs, before anything is written; one line if not."""
    check_name("domain", new_name)   # it names the disk files too
    if fmt not in FORMATS:
        raise RpfsError(f"--format {fmt}: use raw or qcow2")
    if instant and fmt != "raw":
        raise RpfsError("--instant serves raw images; --format qcow2 needs a full restore")
    xml = point.libvirt.get("xml") if point.libvirt else None
    if not xml:
        raise RpfsError(f"recovery point {point.vm}/{point.id} was not taken of a libvirt domain:"
                        " restore its disks with --to")
    domain_xml.new_domain_xml(xml, new_name, {d.name: (Path("/"), fmt) for d in point.disks})   # it must work
    folder = Path(os.path.abspath(folder))
    check_trusted_place(folder, "restore folder", private=True)   # root writes in it
    if not folder.is_dir():
        raise RpfsError(f"folder {folder} does not exist (create it first)")
    suffix = ".qcow2" if fmt == "qcow2" else ".img"
    files = {d.name: str(folder / f"{new_name}-{d.name}{suffix}") for d in point.disks}
    plan = VmRestorePlan(vm=point.vm, point_id=point.id, domain=new_name, folder=str(folder), format=fmt,
                         instant=instant, files=files)
    earlier = _read_record(record_path(folder, new_name))
    if earlier is not None:
        if (earlier.vm, earlier.point_id, earlier.format, earlier.instant, earlier.files) != \
                (plan.vm, plan.point_id, plan.format, plan.instant, plan.files):
            raise RpfsError(f"{record_path(folder, new_name)} is an unfinished restore of {earlier.vm}/"
                            f"{earlier.point_id} as {new_name} ({earlier.format}"
                            f"{', instant' if earlier.instant else ''}): run that again, or remove it and"
                            f" its files ({', '.join(earlier.files.values())})")
        plan.resumed = True
    if _domain_exists(plan, uri):
        raise RpfsError(f"a libvirt domain {new_name} already exists; choose another name")
    for disk in point.disks:
        target = Path(files[disk.name])
        refuse_link(target)
        if target.exists() and plan.resumed:
            continue   # whole (the partial-file protocol): this same restore wrote it before it was killed
        if instant:
            check_trusted_place(target, "instant restore target")
            if target.exists():
                raise RpfsError(f"{target} already exists; remove it or choose another name")
        else:
            check_target(target, disk.size, force=False)
            if fmt == "qcow2" and not plan.resumed:
                check_target(_raw_path(target), disk.size, force=False)
    return plan


def _domain_exists(plan: VmRestorePlan, uri: str) -> bool:
    """Whether a domain of that name exists that is not this restore's own (one a killed run defined
    before removing its record: its disks are this plan's files)."""
    conn = libvirt_host.connect(uri)
    try:
        if not libvirt_host.exists(conn, plan.domain):
            return False
        if not plan.resumed:
            return True
        xml = libvirt_host.domain_xml(libvirt_host.lookup(conn, plan.domain), inactive=True)
    finally:
        conn.close()
    return not plan.instant and {d.path for d in domain_xml.disks(xml) if d.path} != set(plan.files.values())


def restore_as_vm(store: RecoverySource, point: RecoveryPoint, new_name: str, folder: Path, fmt: str = "raw",
                  instant: bool = False, progress: ProgressFactory | None = None, start: bool = False,
                  uri: str = libvirt_host.DEFAULT_URI) -> VmRestored:
    """The point as a new libvirt domain new_name, its disks in folder; see the module's docstring."""
    plan = plan_restore_as_vm(point, new_name, folder, fmt, instant, uri)
    return carry_out(store, point, plan, progress, start, uri)


def carry_out(store: RecoverySource, point: RecoveryPoint, plan: VmRestorePlan,
              progress: ProgressFactory | None = None, start: bool = False,
              uri: str = libvirt_host.DEFAULT_URI) -> VmRestored:
    """Write what plan says: the record, the disks, the domain (last), then remove the record."""
    record = record_path(Path(plan.folder), plan.domain)
    if not plan.resumed:
        try:
            create_whole(record, json.dumps(asdict(plan)).encode())
        except FileExistsError:
            raise RpfsError(f"another restore as {plan.domain} has just begun ({record})") from None
    progress = progress or (lambda _label: nullcontext(None))
    disks: dict[str, str] = {}
    for target_name, file in plan.files.items():
        target = Path(file)
        if plan.instant:
            disks[target_name] = _instant(store, point, target_name, target)
            continue
        if target.exists():
            if plan.format == "qcow2":   # killed after the rename: the raw image it was made from goes now
                _raw_path(target).unlink(missing_ok=True)
        else:
            with progress(f"restore {target_name}") as bar:
                if plan.format == "qcow2":
                    _restore_qcow2(store, point, target_name, target, bar)
                else:
                    restore_disk(store, point, target_name, target, progress=bar)
        disks[target_name] = file
    xml = domain_xml.new_domain_xml(point.libvirt["xml"], plan.domain,
                                    {t: (Path(p), "raw" if plan.instant else plan.format)
                                     for t, p in disks.items()})
    if plan.instant:
        xml = _as_block_devices(xml, disks)
    conn = libvirt_host.connect(uri)
    try:
        if libvirt_host.exists(conn, plan.domain):
            defined = libvirt_host.lookup(conn, plan.domain)   # defined by the run that was killed after it
        else:
            defined = libvirt_host.define(conn, xml)
        new_uuid = defined.UUIDString()
        record.unlink(missing_ok=True)
        fsync_folder(record.parent)
        if start:
            libvirt_host.start(defined)
    finally:
        conn.close()
    return VmRestored(domain=plan.domain, uuid=new_uuid, vm=plan.vm, point_id=plan.point_id, format=plan.format,
                      instant=plan.instant, files=dict(plan.files), disks=disks, started=start)


def _restore_qcow2(store: RecoverySource, point: RecoveryPoint, target_name: str, target: Path,
                   progress: ProgressFn | None) -> None:
    """The full restore writes the raw image (whole, under its own name); qemu-img converts it into a
    partial file, which is synced and renamed; then the raw image goes."""
    raw = _raw_path(target)
    if not raw.exists():
        restore_disk(store, point, target_name, raw, progress=progress)
    partial = partial_path(target)
    refuse_link(partial)
    partial.unlink(missing_ok=True)   # a conversion that was killed: this restore's (its record says so)
    run_tool(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "--", str(raw), str(partial)], timeout=None)
    fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, target)
    fsync_folder(target.parent)
    raw.unlink()
    fsync_folder(target.parent)


def _raw_path(target: Path) -> Path:
    return target.with_name(target.name + RAW_SUFFIX)


def _instant(store: RecoverySource, point: RecoveryPoint, target_name: str, target: Path) -> str:
    """An instant restore into target; the domain gets a loop device over its writable image: libvirt's
    qemu runs as its own user, and the image's FUSE mount lets only root in (the loop device is opened by
    root, and libvirt gives the device to qemu)."""
    from rpfs.restore import instant
    job = instant.start(store, point, target_name, target)
    if job.state == "complete" and not job.pid:
        return str(target)   # the copy finished (a run killed late, run again): the whole file
    existing = run_tool(["losetup", "-j", job.image]).strip()
    if existing:
        return existing.split(":", 1)[0]
    return run_tool(["losetup", "--find", "--show", job.image]).strip()


def _as_block_devices(xml: str, disks: dict[str, str]) -> str:
    """Disks that are loop devices become type='block' disks."""
    import xml.etree.ElementTree as ET
    root = domain_xml.parse(xml)
    for element in root.iterfind("devices/disk"):
        target = element.find("target")
        path = disks.get(target.get("dev", "") if target is not None else "")
        if path and path.startswith("/dev/"):
            element.set("type", "block")
            source = element.find("source")
            source.attrib.pop("file", None)
            source.set("dev", path)
    return ET.tostring(root, encoding="unicode")


def _read_record(path: Path) -> VmRestorePlan | None:
    if not path.exists():
        return None
    try:
        raw = parse_json(path.read_bytes()[:1 << 20])
        return VmRestorePlan(**{k: v for k, v in raw.items() if k in VmRestorePlan.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        raise RpfsError(f"{path} is damaged; remove it and the files it names, then restore again") from None
