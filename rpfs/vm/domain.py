"""A libvirt domain's XML: which disks rpfs backs up (and why not the others), and the XML of a copy.

Discovery reads the disks a domain's XML names and sorts them: backed up (local files and block
devices, raw or qcow2), skipped (removable media, read-only, shareable, excluded by the user) or refused
(network disks and anything else rpfs cannot read as a local file, each with the reason). A refusal is
per disk: the domain's other disks are still backed up.

new_domain_xml makes the XML of a new domain from a point's XML: a new name, no UUID and no MAC
addresses (libvirt makes new ones), the disks pointing at restored files, and no path the original
domain also uses (sockets, logs, NVRAM), so both can run at once.
"""
from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from rpfs.errors import RpfsError

XML_MAX_BYTES = 4 << 20          # a domain's XML is a few KiB; more is not libvirt's
CHAIN_MAX_BYTES = 1 << 20        # qemu-img info's JSON for a backing chain
CHAIN_MAX_DEPTH = 64
QEMU_IMG_TIMEOUT = 60
# The alphabet of disk names on a recovery point: rpfs/store/recovery_point.py NAME_RE (vm may not import
# store, so it is repeated here; tests/test_domain.py checks the two are the same).
DISK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
FORMATS = ("raw", "qcow2")
REMOVABLE = ("cdrom", "floppy")
LOCAL_TYPES = ("file", "block")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)   # qemu:commandline keeps its usual prefix when written back


@dataclass
class DomainDisk:
    target: str                 # vda, sdb...: the disk's name on a recovery point
    device: str                 # disk | lun | cdrom | floppy
    type: str                   # file | block | network | volume | ...
    path: str                   # the file or device ("" for a network disk or an empty drive)
    format: str                 # raw | qcow2 | ... (libvirt's driver type; raw when none is given)
    readonly: bool = False
    shareable: bool = False


@dataclass
class Discovery:
    disks: list[DomainDisk] = field(default_factory=list)        # the disks to back up
    skipped: dict[str, str] = field(default_factory=dict)        # target -> why it is left out, as meant
    refused: dict[str, str] = field(default_factory=dict)        # target -> why rpfs cannot back it up


def parse(xml: str) -> ET.Element:
    """The domain XML's root element; refused when too large or carrying a DOCTYPE or entities."""
    if len(xml) > XML_MAX_BYTES:
        raise RpfsError(f"the domain's XML is {len(xml)} bytes, more than the {XML_MAX_BYTES} rpfs reads")
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise RpfsError("the domain's XML has a DOCTYPE or entities; libvirt never writes them: refused")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise RpfsError(f"the domain's XML does not parse: {e}") from None
    if root.tag != "domain":
        raise RpfsError(f"not a libvirt domain's XML (its root is <{root.tag[:40]}>)")
    return root


def name(xml: str) -> str:
    return (parse(xml).findtext("name") or "").strip()


def uuid(xml: str) -> str:
    return (parse(xml).findtext("uuid") or "").strip()


def disks(xml: str) -> list[DomainDisk]:
    """Every <disk> of the domain, as written (no judgement yet)."""
    return [_disk(element) for element in parse(xml).iterfind("devices/disk")]


def _disk(element: ET.Element) -> DomainDisk:
    source = element.find("source")
    driver = element.find("driver")
    kind = element.get("type", "file")
    path = ""
    if source is not None:
        path = source.get("file" if kind == "file" else "dev" if kind == "block" else "", "") or ""
    target = element.find("target")
    return DomainDisk(target=target.get("dev", "") if target is not None else "",
                      device=element.get("device", "disk"), type=kind, path=path,
                      format=(driver.get("type") if driver is not None else None) or "raw",
                      readonly=element.find("readonly") is not None,
                      shareable=element.find("shareable") is not None)


def discover(xml: str, exclude: set[str] | frozenset[str] = frozenset()) -> Discovery:
    """Sort the domain's disks into those to back up, those skipped and those refused, each with why.
    An excluded name the domain has no disk of is an error (a typo would back up a disk meant to be left out)."""
    found = Discovery()
    all_disks = disks(xml)
    unknown = sorted(set(exclude) - {d.target for d in all_disks})
    if unknown:
        raise RpfsError(f"--exclude-disk {', '.join(unknown)}: the domain has no such disk"
                        f" (disks: {', '.join(d.target for d in all_disks) or 'none'})")
    for disk in all_disks:
        skip, refuse = _judge(disk, exclude)
        if skip:
            found.skipped[disk.target] = skip
        elif refuse:
            found.refused[disk.target or "(no target)"] = refuse
        else:
            found.disks.append(disk)
    return found


def _judge(disk: DomainDisk, exclude) -> tuple[str, str]:
    """(why it is skipped, why it is refused); both "" for a disk to back up."""
    if disk.target in exclude:
        return "excluded by --exclude-disk", ""
    if disk.device in REMOVABLE:
        return f"a {'CD-ROM' if disk.device == 'cdrom' else 'floppy'} drive", ""
    if disk.readonly:
        return "read-only", ""
    if disk.shareable:
        return "shareable: other domains write it too, so no snapshot of it is consistent", ""
    if not DISK_NAME_RE.fullmatch(disk.target):
        return "", f"its target {disk.target[:40]!r} is not a name rpfs can give a disk"
    if disk.type not in LOCAL_TYPES:
        return "", (f"a {disk.type} disk: rpfs backs up local files and block devices only"
                    " (back it up where it is stored)")
    if not disk.path:
        return "", f"a {disk.type} disk with no source"
    if disk.format not in FORMATS:
        return "", f"format {disk.format[:20]}: rpfs reads raw and qcow2 disks only"
    return "", ""


def backing_chain(path: Path, fmt: str) -> list[Path]:
    """The image and the files under it, top first (a raw image has none); -U reads a file a running
    qemu holds. qemu-img's answer is bounded in size and time and parsed strictly."""
    if fmt == "raw":
        return [Path(path)]
    try:
        proc = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", "-U", "-f", fmt,
                               "--", str(path)], capture_output=True, timeout=QEMU_IMG_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RpfsError("qemu-img not found (run tools/setup)") from None
    except subprocess.TimeoutExpired:
        raise RpfsError(f"qemu-img info {path} did not answer within {QEMU_IMG_TIMEOUT}s") from None
    if proc.returncode != 0:
        line = next((s.strip() for s in proc.stderr.decode(errors="replace").splitlines() if s.strip()), "")
        raise RpfsError(f"qemu-img cannot read {path}: {line[:300] or f'exit code {proc.returncode}'}")
    if len(proc.stdout) > CHAIN_MAX_BYTES:
        raise RpfsError(f"qemu-img info {path} said more than {CHAIN_MAX_BYTES} bytes: refused")
    try:
        chain = json.loads(proc.stdout)
        if not isinstance(chain, list) or not chain or len(chain) > CHAIN_MAX_DEPTH:
            raise ValueError("not a list of 1 to 64 images")
        files = []
        for image in chain:
            if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
                raise ValueError("an image without a filename")
            files.append(Path(image["filename"]))
    except (ValueError, RecursionError) as e:
        raise RpfsError(f"qemu-img info {path}: its answer is not understood ({e})") from None
    return files


def new_domain_xml(xml: str, new_name: str, disks: dict[str, tuple[Path, str]]) -> str:
    """The XML of a new domain made from xml: disks maps a target to its restored (file, format); a disk
    not in it is left out, except removable drives, which stay, empty. Shared host folders (<filesystem>)
    and passed-through devices (<hostdev>) are left out: the copy runs beside the original."""
    root = parse(xml)
    _rename(root, new_name)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    seen = set()
    for element in list(devices.iterfind("disk")):
        disk = _disk(element)
        if disk.target in disks:
            seen.add(disk.target)
            path, fmt = disks[disk.target]
            _point_at(element, Path(path), fmt)
        elif disk.device in REMOVABLE:
            _empty(element)
        else:
            devices.remove(element)
    missing = sorted(set(disks) - seen)
    if missing:
        raise RpfsError(f"the domain's XML has no disk {', '.join(missing)}")
    for shared in ("filesystem", "hostdev"):   # the original's host folders and devices: never the copy's
        for element in list(devices.iterfind(shared)):
            devices.remove(element)
    old_name = (ET.fromstring(xml).findtext("name") or "").strip()
    _own_paths(root, old_name, new_name)
    return ET.tostring(root, encoding="unicode")


def _rename(root: ET.Element, new_name: str) -> None:
    """A new name; no UUID, id or MAC address: libvirt gives the new domain its own."""
    for key in ("id",):
        root.attrib.pop(key, None)
    name_element = root.find("name")
    if name_element is None:
        name_element = ET.SubElement(root, "name")
    name_element.text = new_name
    for tag in ("uuid", "genid"):
        for element in root.findall(tag):
            root.remove(element)
    for parent in root.iter():
        for child in list(parent):
            if child.tag in ("mac", "alias") or (parent.tag == "interface" and child.tag == "target"):
                parent.remove(child)   # MACs and tap names are libvirt's to give; aliases are runtime-only
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "dynamic":   # a running domain's labels: libvirt picks new ones
            for child in list(seclabel):
                if child.tag in ("label", "imagelabel"):
                    seclabel.remove(child)


def _point_at(element: ET.Element, path: Path, fmt: str) -> None:
    """The disk is now the restored file: a plain file of format fmt, no backing chain, no runtime state."""
    element.set("type", "file")
    for child in list(element):
        if child.tag in ("source", "backingStore", "mirror", "alias", "readonly", "shareable"):
            element.remove(child)
    driver = element.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        element.insert(0, driver)
    driver.set("type", fmt)
    source = ET.Element("source", {"file": str(path)})
    element.insert(list(element).index(driver) + 1, source)


def _empty(element: ET.Element) -> None:
    """A CD-ROM or floppy drive kept, with no medium in it."""
    element.set("type", "file")
    for child in list(element):
        if child.tag in ("source", "backingStore", "mirror", "alias"):
            element.remove(child)


def _own_paths(root: ET.Element, old_name: str, new_name: str) -> None:
    """No socket, log or NVRAM path the original uses: libvirt picks its defaults where a path is left
    out (a guest agent channel's socket, the NVRAM file); a path the user chose is renamed."""
    devices = root.find("devices")
    for element in (devices if devices is not None else []):
        if element.tag not in ("channel", "serial", "console", "parallel"):
            continue
        source = element.find("source")
        target = element.find("target")
        if source is not None and "path" in source.attrib:
            if element.tag == "channel" and element.get("type") == "unix" and target is not None \
                    and target.get("type") == "virtio":
                del source.attrib["path"]   # libvirt makes one under its own folder for the new domain
            else:
                source.set("path", _renamed(source.get("path", ""), old_name, new_name))
        for log in element.findall("log"):
            if "file" in log.attrib:
                log.set("file", _renamed(log.get("file", ""), old_name, new_name))
    nvram = root.find("os/nvram")
    if nvram is not None:
        nvram.text = None   # libvirt makes <name>_VARS.fd from the template: a fresh set of variables
    for graphics in root.iterfind("devices/graphics"):
        if graphics.get("autoport") == "no" or graphics.get("port") not in (None, "-1"):
            graphics.set("autoport", "yes")   # a fixed port would be the original's
            graphics.attrib.pop("port", None)
            graphics.attrib.pop("websocket", None)


def _renamed(path: str, old_name: str, new_name: str) -> str:
    """path with the domain's name in its file name replaced; without it, the new name added."""
    folder, _, file_name = path.rpartition("/")
    if old_name and old_name in file_name:
        file_name = file_name.replace(old_name, new_name)
    else:
        stem, dot, suffix = file_name.rpartition(".")
        file_name = f"{stem}-{new_name}.{suffix}" if dot and stem else f"{file_name}-{new_name}"
    return f"{folder}/{file_name}" if folder or path.startswith("/") else file_name
