"""What the crash campaign (tools/chaos) works on, apart from rpfs: the kernel objects it creates below its
work folder, the VM's disk, the writer inside an instant-restore image, and LMDB's page layout.

    python tools/campaigns/chaos_lib.py writer IMAGE LOG    # the writer process the campaign starts and kills

Every kernel object is made below the work folder and undone by Workbench.close, whatever happened.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MiB = 1 << 20
RECORD = 4096


def create(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """A new file root writes: never through a planted link, never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def run(*cmd: str, timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _quietly(*cmd: str) -> int:
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode


def mounts_below(folder: Path) -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount at or below folder, deepest first."""
    prefix = os.path.realpath(folder).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            sep = fields.index("-")
            if (point + "/").startswith(prefix):
                found.append((point, fields[sep + 1], fields[sep + 2]))
    return sorted(found, key=lambda m: m[0].count("/"), reverse=True)


def loops_below(folder: Path) -> list[tuple[str, str]]:
    """(loop device, backing file) of every loop device whose file lies below folder."""
    listed = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                            capture_output=True, text=True).stdout
    prefix = os.path.realpath(folder).rstrip("/") + "/"
    rows = (line.split(None, 1) for line in listed.splitlines())   # columns are padded: /dev/loop5  /x
    return [(row[0], row[1].strip()) for row in rows if len(row) == 2 and row[1].strip().startswith(prefix)]


class Workbench:
    """The filesystems the campaign's VM lives on, each on a loop device below the work folder:
    - an XFS with reflinks holding the VM's disk and the restore targets, so backups take reflink
      snapshots (and keep them) and restores of a kept snapshot clone it;
    - a small ext4, the application's filesystem that consistent backups freeze."""

    def __init__(self, work: Path):
        self.work = Path(os.path.realpath(work))
        self.xfs, self.app = work / "xfs", work / "app"
        self.mounted: list[Path] = []

    def open(self) -> None:
        for image, size, mountpoint, mkfs in (   # mkfs.xfs wants 300 MiB at least (the file is sparse)
                (self.work / "xfs.img", 300 * MiB, self.xfs, ["mkfs.xfs", "-q", "-m", "reflink=1"]),
                (self.work / "app.img", 8 * MiB, self.app, ["mkfs.ext4", "-q", "-F"])):
            with open(create(image, b""), "r+b") as f:
                f.truncate(size)
            run(*mkfs, str(image))
            mountpoint.mkdir(mode=0o700)
            run("mount", "-o", "loop", str(image), str(mountpoint))
            self.mounted.append(mountpoint)

    def own_mounts(self) -> set[str]:
        return {str(m) for m in self.mounted}

    def own_loops(self) -> set[str]:
        return {str(self.work / "xfs.img"), str(self.work / "app.img")}

    def release(self, keep_own: bool) -> list[str]:
        """Undo every mount and loop device below the work folder (any a failed step left, and with
        keep_own False the workbench's own); returns what there was."""
        forced = []
        if not keep_own and self.mounted:
            _quietly("fsfreeze", "-u", str(self.app))   # a frozen filesystem cannot be unmounted
        for mountpoint, fstype, _ in mounts_below(self.work):
            if mountpoint in self.own_mounts():
                continue
            forced.append(mountpoint)
            if not (fstype.startswith("fuse") and _quietly("fusermount3", "-u", "-z", mountpoint) == 0):
                _quietly("umount", "-l", mountpoint)
        for mountpoint in [] if keep_own else reversed(self.mounted):
            if _quietly("umount", str(mountpoint)) != 0:
                forced.append(str(mountpoint))
                _quietly("umount", "-l", str(mountpoint))
        if not keep_own:
            self.mounted.clear()
        for device, back in loops_below(self.work):
            if back not in self.own_loops():
                forced.append(device)
                _quietly("losetup", "-d", device)
            elif not keep_own:
                _quietly("losetup", "-d", device)   # its mount is gone: a loop device not auto-cleared yet
        return forced

    def close(self) -> list[str]:
        """Undo everything; returns what had to be forced (anything left but the workbench's own)."""
        return self.release(keep_own=False)

    def writable(self, seconds: float = 5.0) -> bool:
        """Can the application's filesystem be written (it is not left frozen)? A write to a frozen
        filesystem blocks, uninterruptibly: the child is waited for after a thaw."""
        writer = subprocess.Popen(["sh", "-c", f"echo ok > {self.app}/probe"])
        try:
            writer.wait(timeout=seconds)
            return writer.returncode == 0
        except subprocess.TimeoutExpired:
            subprocess.run(["fsfreeze", "-u", str(self.app)], capture_output=True)
            writer.wait()
            return False

    def freeze_watchdogs(self, seconds: float = 10.0) -> list[int]:
        """Freeze watchdogs still watching the application's filesystem after `seconds` (one whose backup
        was killed thaws and leaves within a few seconds)."""
        deadline = time.monotonic() + seconds
        while True:
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"rpfs.backup.freeze_watchdog" in cmdline and os.fsencode(self.app) in cmdline:
                    found.append(int(pid))
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


class VmDisk:
    """The VM's disk: an ext4 image with files the campaign knows. The VM's writes between backups are
    made with debugfs, never through a mount, so the image's bytes are exactly what the next backup reads."""

    def __init__(self, path: Path, scratch: Path, size: int):
        self.path, self.scratch, self.size = path, scratch, size
        self.files: dict[str, str] = {}      # name -> sha256 of its content
        self.sizes: dict[str, int] = {}

    def create(self) -> None:
        with open(create(self.path, b""), "r+b") as f:
            f.truncate(self.size)
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.path))

    def change(self, rng: random.Random, room: int) -> None:
        """Write 1 to 3 files of random content (replacing some), removing the oldest beyond `room` bytes."""
        commands, sizes = [], {}
        for _ in range(rng.randint(1, 3)):
            name = f"f{rng.randrange(12):02d}.bin"
            data = rng.randbytes(rng.randint(1, MiB))
            source = self.scratch / f"{name}.{len(commands)}"
            create(source, data)
            if self.files.pop(name, None) is not None:   # rewritten: now the newest
                commands.append(f"rm {name}")
            commands.append(f"write {source} {name}")
            self.files[name], sizes[name] = hashlib.sha256(data).hexdigest(), len(data)
        script = create(self.scratch / "debugfs.cmds", "\n".join(commands).encode() + b"\n")
        try:
            run("debugfs", "-w", "-f", str(script), str(self.path))
        finally:
            for path in self.scratch.iterdir():
                path.unlink()
        self.sizes.update(sizes)
        while sum(self.sizes.get(n, 0) for n in self.files) > room:
            oldest = next(iter(self.files))
            run("debugfs", "-w", "-R", f"rm {oldest}", str(self.path))
            del self.files[oldest]

    @staticmethod
    def read_files(folder: Path) -> dict[str, str]:
        """name -> sha256 of the files an attached copy of the disk shows."""
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
                if p.name != "lost+found"}


# -- the writer inside an instant-restore image --------------------------------------------------------
def record(n: int) -> bytes:
    """Record n: its number, a body derived from it, and a checksum of both; RECORD bytes."""
    head = b"RPFSREC1" + n.to_bytes(8, "little")
    body = b"".join(hashlib.sha256(head + i.to_bytes(2, "little")).digest() for i in range(127))[:RECORD - 48]
    return head + body + hashlib.sha256(head + body).digest()


def slot(n: int, slots: int) -> int:
    """Where record n goes: a different RECORD-sized slot for each n below slots (a power of two)."""
    return (n * 2654435761) % slots


def acknowledged(log: Path) -> list[int]:
    """The records the writer saw written and fsynced."""
    try:
        return [int(line) for line in log.read_text().split()]
    except FileNotFoundError:
        return []


def writer(image: str, log: str) -> int:
    """Write numbered records into image, each pwrite()n and fsynced before its number is logged; go on
    from the last logged one (a restarted writer redoes the one it may have been killed in)."""
    slots = os.stat(image).st_size // RECORD
    first = max(acknowledged(Path(log)), default=0) + 1
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for n in range(first, slots):
            os.pwrite(fd, record(n), slot(n, slots) * RECORD)
            os.fsync(fd)
            os.write(log_fd, b"%d\n" % n)
    except OSError as e:   # the image's daemon died: the campaign resumes it and starts us again
        print(f"writer: record {n}: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        os.close(fd)
        os.close(log_fd)
    return 0


@contextmanager
def running_writer(image: str, log: Path) -> Iterator[subprocess.Popen]:
    """The writer as a process of its own; killed and waited for when the block ends."""
    proc = subprocess.Popen([sys.executable, __file__, "writer", image, str(log)], stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


# -- LMDB's page layout ---------------------------------------------------------------------------------
def lmdb_pages(data: bytes, page: int = 4096) -> dict[str, list[int]]:
    """The pages of an LMDB file (format 0.9, 64-bit) by kind, found by walking its B-trees from the
    newer meta page: meta, branch, leaf, overflow (the stored blocks' bytes)."""
    kinds: dict[int, str] = {0: "meta", 1: "meta"}

    def walk(root: int) -> None:
        if root in kinds or (root + 1) * page > len(data):
            return
        base = root * page
        flags, lower = struct.unpack_from("<HH", data, base + 10)
        kind = "branch" if flags & 1 else "leaf" if flags & 2 else None
        if kind is None:
            return
        kinds[root] = kind
        for i in range((lower - 16) // 2):
            node = base + struct.unpack_from("<H", data, base + 16 + 2 * i)[0]
            lo, hi, node_flags, key_size = struct.unpack_from("<HHHH", data, node)
            if kind == "branch":
                walk(lo | hi << 16 | node_flags << 32)
            elif node_flags & 1:      # F_BIGDATA: the value lives in overflow pages
                first = struct.unpack_from("<Q", data, node + 8 + key_size)[0]
                count = struct.unpack_from("<I", data, first * page + 12)[0]
                kinds.update({p: "overflow" for p in range(first, first + count)})
            elif node_flags & 2:      # F_SUBDATA: a named database's record, its root at +40
                walk(struct.unpack_from("<Q", data, node + 8 + key_size + 40)[0])
    meta = max((0, 1), key=lambda p: struct.unpack_from("<Q", data, p * page + 144)[0])
    for db in (0, 1):   # the free list and the main database
        walk(struct.unpack_from("<Q", data, meta * page + 40 + 48 * db + 40)[0])
    found: dict[str, list[int]] = {}
    for p, kind in sorted(kinds.items()):
        found.setdefault(kind, []).append(p)
    return found


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    raise SystemExit(writer(*sys.argv[2:4]))
