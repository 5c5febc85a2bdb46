"""The test guest: a Debian kernel and a tiny initramfs (busybox, the host's qemu-ga), built once and kept.

    python3 tools/services/guest_lib.py build     # prints the cache folder (builds it first if missing)

The tests need a real guest with a real agent, and a Debian cloud image is slow to boot under TCG (this host's
/dev/kvm cannot run guest kernels). A kernel and an initramfs of a few MiB boot to a answering agent in seconds:
the kernel from `apt-get download` of the versioned linux-image package, the initramfs written here (cpio newc,
gzip) with busybox-static, /usr/sbin/qemu-ga and the libraries ldd names, and the modules for virtio disks, the
virtio console (the agent's channel) and ext4.

The cache folder /var/cache/rpfs-guest/<key>/ is named by a digest of everything that goes in (the kernel
package and version, the busybox and qemu-ga binaries, this file): a change to any makes a new one. It is built
in a temporary folder beside it and renamed into place, so a folder under its final name is always whole.
Standard library only: it runs with the system python3, before any venv exists.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("RPFS_GUEST_CACHE", "/var/cache/rpfs-guest"))
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
# What /init loads (their dependencies come first): the PCI transport, disks, the agent's port, ext4 and the
# crc32c that ext4's metadata checksums ask for by name (no modprobe would answer that request in the guest).
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")
FILES = ("vmlinuz", "initrd.img", "kernel-version")

INIT = r"""#!/bin/sh
# The rpfs test guest's init: modules, the data disk on /data, the freeze hook, qemu-ga, a shell on the console.
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp /data
mount -t tmpfs run /run
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "rpfs-guest: insmod $m failed"; done
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
if [ -b /dev/vda ]; then mount -t ext4 /dev/vda /data || echo "rpfs-guest: mount /dev/vda failed"; fi
port=
for i in $(seq 100); do
  for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename "$(dirname "$n")")
  done
  [ -n "$port" ] && [ -c "$port" ] && break
  sleep 0.1
done
if [ -n "$port" ]; then
  qemu-ga -m virtio-serial -p "$port" -F/etc/qemu/fsfreeze-hook -t /run -l /run/qemu-ga.log &
  echo "rpfs-guest: qemu-ga started on $port"
else
  echo "rpfs-guest: no org.qemu.guest_agent.0 port"
fi
echo "rpfs-guest: ready"
while true; do setsid cttyhack sh; sleep 1; done
"""

HOOK = r"""#!/bin/sh
# qemu-ga runs this with "freeze" before it freezes and "thaw" after it thaws: each script in fsfreeze-hook.d.
for s in /etc/qemu/fsfreeze-hook.d/*; do
  [ -x "$s" ] && "$s" "$1"
done
exit 0
"""

HOOK_D = r"""#!/bin/sh
# Proof for the tests that the guest's own hook ran: one line per call on the data disk.
[ -d /data ] && echo "$1 $(date +%s)" >> /data/hook.log
exit 0
"""


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"guest: {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def kernel_package() -> tuple[str, str]:
    """The versioned linux-image package that linux-image-amd64 depends on, and its candidate version."""
    depends = run("apt-cache", "depends", META_PACKAGE)
    names = re.findall(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", depends)
    if not names:
        raise SystemExit(f"guest: {META_PACKAGE} names no versioned kernel package")
    policy = run("apt-cache", "policy", names[0])
    version = re.search(r"Candidate: (\S+)", policy)
    if version is None or version.group(1) == "(none)":
        raise SystemExit(f"guest: no candidate version of {names[0]} (apt-get update?)")
    return names[0], version.group(1)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(package: str, version: str) -> str:
    parts = [package, version, file_digest(BUSYBOX), file_digest(QEMU_GA), file_digest(Path(__file__))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def whole(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in FILES)


def module_depends(ko: Path) -> list[str]:
    """The depends= field of the module's .modinfo section (no modinfo on this host: kmod is not installed)."""
    data = ko.read_bytes()
    found = re.search(rb"\0depends=([^\0]*)\0", data)
    return [d.decode() for d in found.group(1).split(b",") if d] if found else []


def module_order(tree: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files of the wanted modules and their dependencies, each after what it depends on."""
    files = {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in tree.rglob("*.ko")}
    if not files:
        raise SystemExit(f"guest: no uncompressed .ko under {tree}")
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            raise SystemExit(f"guest: module {name} not found in the kernel package (built in?)")
        for dep in module_depends(files[name]):
            visit(dep)
        order.append(files[name])

    for name in wanted:
        visit(name)
    return order


def libraries(binary: Path) -> list[Path]:
    """The shared libraries ldd names for a binary, the loader included, as absolute paths."""
    paths = []
    for line in run("ldd", str(binary)).splitlines():
        found = re.search(r"(/\S+) \(0x", line)
        if found:
            paths.append(Path(found.group(1)))
    return paths


class Cpio:
    """A cpio "newc" archive written by hand: device nodes need no root, and the order is ours."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def initramfs(modules: list[Path]) -> bytes:
    archive = Cpio()
    made: set[str] = set()

    def parents(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder and folder not in made:
                made.add(folder)
                archive.directory(folder)

    for folder in ("bin", "dev", "proc", "sys", "run", "tmp", "data", "etc/qemu/fsfreeze-hook.d",
                   "lib/modules", "usr/sbin", "var"):
        parents(folder + "/x")
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)
    archive.symlink("sbin", "bin")
    archive.symlink("usr/bin", "../bin")
    archive.symlink("var/run", "../run")
    archive.file("bin/busybox", BUSYBOX.read_bytes())
    for applet in sorted(set(run(str(BUSYBOX), "--list").split()) - {"busybox"}):
        archive.symlink(f"bin/{applet}", "busybox")
    archive.file("usr/sbin/qemu-ga", QEMU_GA.read_bytes())
    for library in libraries(QEMU_GA):
        name = str(library).lstrip("/")
        if name not in made:
            parents(name)
            made.add(name)
            archive.file(name, library.read_bytes())  # the file a symlink names, under the name ldd gave
    for ko in modules:
        archive.file(f"lib/modules/{ko.name}", ko.read_bytes(), 0o644)
    archive.file("lib/modules/order", "".join(ko.name.removesuffix(".ko") + "\n" for ko in modules).encode(),
                 0o644)
    archive.file("init", INIT.encode())
    archive.file("etc/qemu/fsfreeze-hook", HOOK.encode())
    archive.file("etc/qemu/fsfreeze-hook.d/rpfs-test", HOOK_D.encode())
    return gzip.compress(archive.bytes(), compresslevel=6, mtime=0)


def build_into(folder: Path, package: str) -> None:
    run("apt-get", "download", "-q", package, cwd=folder)
    deb = next(folder.glob(f"{package}_*.deb"))
    tree = folder / "tree"
    run("dpkg-deb", "-x", str(deb), str(tree))
    vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    modules = module_order(tree / "lib/modules" / version, MODULES)
    (folder / "initrd.img").write_bytes(initramfs(modules))
    shutil.copyfile(vmlinuz, folder / "vmlinuz")
    (folder / "kernel-version").write_text(version + "\n")
    shutil.rmtree(tree)
    deb.unlink()


def build() -> Path:
    """The cache folder of the current guest, built first if it is missing or not whole."""
    package, version = kernel_package()
    final = CACHE / cache_key(package, version)
    if final.is_dir() and whole(final):
        return final
    CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = CACHE.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise SystemExit(f"guest: {CACHE} must be a folder owned by root, writable by root only")
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=CACHE))
    try:
        work.chmod(0o700)  # apt-get download drops to _apt where it can; root-only is fine (it warns, still works)
        build_into(work, package)
        if final.exists():
            shutil.rmtree(final)  # a partial folder can only come from older code: ours rename whole ones
        os.rename(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return final


def main() -> int:
    if sys.argv[1:] != ["build"]:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(build())
    return 0


if __name__ == "__main__":
    sys.exit(main())
