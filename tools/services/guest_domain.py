"""The test guest as a libvirt domain: its XML and its qcow2 data disk, shared by the tests (tests/vm_helpers.py)
and the crash campaign (tools/chaos), which both start the guest of tools/guest.

Standard library only, and kept apart from guest_lib.py: that file's digest names the guest's cache folder, so
an edit there would rebuild the guest.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

IMAGES = Path("/var/lib/libvirt/images")   # libvirt's qemu (user libvirt-qemu) reaches files here
TEST_PREFIX = "rpfs-test-"                 # every test domain's name starts so (tools/libvirt removes them)


def make_data_disk(path: Path, size: int) -> Path:
    """A qcow2 file of `size` virtual bytes holding an empty ext4 (made on a sparse raw file, then converted)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "rpfs-data", str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def image_format(path: Path) -> str:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["format"]


def domain_xml(name: str, folder: Path, data_disk: Path, disk_format: str) -> str:
    """A TCG domain (this host's /dev/kvm hangs guest kernels) booting folder's vmlinuz and initrd.img, its
    only disk vda, the agent's channel, the serial console logged to folder/console.log."""
    def path(p: Path) -> str:
        return quoteattr(str(p))
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(folder / 'vmlinuz'))}</kernel>
    <initrd>{escape(str(folder / 'initrd.img'))}</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type={quoteattr(disk_format)}/>
      <source file={path(data_disk)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='pty'>
      <log file={path(folder / 'console.log')} append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <interface type='user'>
      <model type='virtio'/>
    </interface>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def remove_domain(conn, name: str) -> None:
    """Destroy and undefine the domain if it exists, with its snapshot and checkpoint metadata."""
    import libvirt
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    try:
        if domain.isActive():
            domain.destroy()
    except libvirt.libvirtError:
        pass
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    try:
        domain.undefineFlags(flags)
    except libvirt.libvirtError:
        pass
