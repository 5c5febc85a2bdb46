"""The test guest's libvirt domain XML, shared by the tests (tests/vm_helpers.py) and tools/bench --vm.

A module of its own, not part of guest_lib.py: guest_lib.py's digest names the built guest's cache folder, so
an edit there rebuilds the guest; the domain XML has nothing to do with what the guest is built from.
Standard library only.
"""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape, quoteattr


def domain_xml(name: str, folder: Path, data_disk: Path, disk_format: str) -> str:
    """A TCG domain booting folder/vmlinuz + initrd.img with data_disk as vda, the agent's channel and a
    console log in folder/console.log (folder must be reachable by libvirt's qemu)."""
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
