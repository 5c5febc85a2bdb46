"""A libvirt domain booting the test guest (tools/guest), shared by the tests (tests/vm_helpers.py) and tools/demo.

    .venv/bin/python tools/services/guest_domain.py up NAME         # define + start NAME, wait for its agent
    .venv/bin/python tools/services/guest_domain.py wait NAME       # wait until NAME's agent answers
    .venv/bin/python tools/services/guest_domain.py exec NAME CMD   # /bin/sh -c CMD in the guest, its output
    .venv/bin/python tools/services/guest_domain.py down NAME...    # destroy + undefine, remove its folder

Apart from tools/services/guest_lib.py because that file's digest names the guest's cache folder: a change here
must not rebuild the guest. Domains are type='qemu' (TCG: this host's /dev/kvm hangs guest kernels), their
folder /var/lib/libvirt/images/NAME (0711: libvirt's qemu reaches the files, other users cannot list them).
libvirt-python is imported lazily: the XML and disk helpers work without it. Names must start with rpfs-test-
so that `tools/libvirt stop` removes leftovers. What the guest answers is untrusted: the CLI prints it with
control characters escaped.
"""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

IMAGES = Path("/var/lib/libvirt/images")
URI = "qemu:///system"
PREFIX = "rpfs-test-"
DATA_DISK_BYTES = 256 << 20
GUEST_TOOL = Path(__file__).resolve().parent.parent / "guest"


class GuestError(Exception):
    """The guest did not answer in time, or a command in it did not finish."""


def guest_files() -> Path:
    """The cache folder of the test guest (vmlinuz, initrd.img), built on first use (tools/guest build)."""
    done = subprocess.run([str(GUEST_TOOL), "build"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise GuestError(f"tools/guest build failed: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def make_data_disk(path: Path, size: int = DATA_DISK_BYTES) -> Path:
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


def open_connection():
    """qemu:///system, with libvirt's errors raised instead of also printed on stderr."""
    import libvirt
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    return libvirt.open(URI)


def remove_domain(conn, name: str) -> None:
    """Destroy and undefine the domain if it exists, with its snapshot and checkpoint metadata."""
    import libvirt
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if domain.isActive():
            domain.destroy()
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    with contextlib.suppress(libvirt.libvirtError):
        domain.undefineFlags(flags)


def define_guest(conn, name: str, files: Path, data_disk: Path | None = None, disk_bytes: int = DATA_DISK_BYTES):
    """Define `name` booting the guest in `files`, in a new folder IMAGES/name (a leftover domain of that name
    and its folder are removed first); `data_disk` is its vda, else a new qcow2 of disk_bytes with ext4 in the
    folder.
    Returns (domain, folder, disk); the caller removes both (remove_domain, then the folder)."""
    folder = IMAGES / name
    remove_domain(conn, name)
    shutil.rmtree(folder, ignore_errors=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    folder.mkdir(mode=0o711)   # libvirt's qemu (libvirt-qemu) must reach the files; others may not list
    for part in ("vmlinuz", "initrd.img"):   # copies: libvirt relabels the files a domain boots from
        shutil.copyfile(files / part, folder / part)
    disk = data_disk if data_disk is not None else make_data_disk(folder / "data.qcow2", disk_bytes)
    domain = conn.defineXML(domain_xml(name, folder, disk, image_format(disk)))
    return domain, folder, disk


def agent(domain, command: str, arguments: dict | None = None, timeout: int = 10) -> object:
    """One guest agent command; its "return" value (libvirt raises on an agent error or timeout)."""
    import libvirt_qemu
    request = {"execute": command, **({"arguments": arguments} if arguments is not None else {})}
    answer = libvirt_qemu.qemuAgentCommand(domain, json.dumps(request), timeout, 0)
    return json.loads(answer)["return"]


def wait_for_agent(domain, timeout: float = 180) -> float:
    """Seconds until the agent answered guest-ping, with bounded retries; GuestError after `timeout`."""
    import libvirt
    start = time.monotonic()
    deadline = start + timeout
    delay = 0.2
    while True:
        try:
            agent(domain, "guest-ping", timeout=5)
            return time.monotonic() - start
        except libvirt.libvirtError as error:
            if time.monotonic() > deadline:
                raise GuestError(f"{domain.name()}: agent did not answer within {timeout:.0f} s: {error}") \
                    from error
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def guest_exec(domain, cmd: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `/bin/sh -c cmd` in the guest through guest-exec; (exitcode, stdout, stderr)."""
    pid = agent(domain, "guest-exec", {"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        status = agent(domain, "guest-exec-status", {"pid": pid})
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
            return status.get("exitcode", -status.get("signal", 0) or -1), out, err
        if time.monotonic() > deadline:
            raise GuestError(f"{domain.name()}: {cmd!r} did not finish within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _escaped(text: str, limit: int = 4096) -> str:
    """The guest's text, cut to `limit` characters, control characters (but newlines) shown as escapes."""
    cut = text[:limit]
    return "".join(c if c == "\n" or (c.isprintable() and c != "\x7f") else repr(c)[1:-1] for c in cut)


def _main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    wanted = {"up": 2, "wait": 2, "exec": 3}
    if len(argv) < 2 or argv[0] not in (*wanted, "down") or len(argv) != wanted.get(argv[0], len(argv)):
        print(usage, file=sys.stderr)
        return 2
    command, names = argv[0], argv[1:] if argv[0] == "down" else argv[1:2]
    if any(not n.startswith(PREFIX) for n in names):
        print(f"guest_domain: domain names start with {PREFIX}", file=sys.stderr)
        return 2
    import libvirt
    try:
        conn = open_connection()
    except libvirt.libvirtError as error:
        print(f"guest_domain: {URI}: {error} (tools/libvirt start)", file=sys.stderr)
        return 1
    try:
        if command == "down":
            for name in names:
                remove_domain(conn, name)
                shutil.rmtree(IMAGES / name, ignore_errors=True)
            return 0
        name = names[0]
        if command == "up":
            domain, _folder, _disk = define_guest(conn, name, guest_files())
            domain.create()
        else:
            domain = conn.lookupByName(name)
        if command in ("up", "wait"):
            print(f"{name}: agent answered {wait_for_agent(domain):.1f} s after start")
            return 0
        code, out, err = guest_exec(domain, argv[2])
        sys.stdout.write(_escaped(out))
        sys.stderr.write(_escaped(err))
        return code
    except (GuestError, libvirt.libvirtError) as error:
        print(f"guest_domain: {error}", file=sys.stderr)
        return 1
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
