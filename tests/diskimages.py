"""Builders for real disk-image fixtures (plain functions, so any test or benchmark can call them).

Every filesystem is built into its own sparse scratch file by mkfs, populated without mounting
(`mkfs.ext4 -d`, an `mkfs.xfs -p` protofile), then copied, data extents only, into the image at its
partition offset. That keeps images sparse and needs no root, loop device or mount, so nothing
can leak; only make_dirty_image / mounted_rw mount (it must, to get a journal that needs recovery).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

MiB = 1 << 20
SECTOR = 512

# mkfs.xfs (xfsprogs >= 5.19) refuses filesystems smaller than 300 MiB without --unsupported;
# the image is sparse, so the size costs only the metadata actually written (~5 MiB).
XFS_SIZE = 300 * MiB
EXT4_SIZE = 32 * MiB

LINUX_GPT = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SWAP_GPT = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
BASIC_DATA_GPT = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


@dataclass(frozen=True)
class PartitionSpec:
    """One partition to lay out: size, table type code, and a function that fills a scratch file."""

    size: int
    type: str
    build: Callable[[Path], None] | None = None


def random_files(seed: int, count: int = 8, max_size: int = 256 * 1024, subdirs: bool = True) -> dict[str, bytes]:
    """Deterministic file contents mixing random (incompressible) and repetitive (compressible) bytes."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(count):
        size = rng.randint(0, max_size)
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(size)
        elif kind == 1:
            data = (f"line {seed}-{i} compressible text\n".encode() * (size // 30 + 1))[:size]
        else:
            half = size // 2
            data = rng.randbytes(half) + bytes(size - half)
        folder = f"dir{i % 3}/sub{i % 2}/" if subdirs and i % 2 else ""
        files[f"{folder}file{i:03d}.bin"] = data
    return files


def make_partitioned_image(path: Path, parts: list[tuple[str | None, dict[str, bytes]]], label: str = "gpt") -> Path:
    """Image with one partition per (fstype, files); fstype None leaves the partition blank.

    fstype is one of ext4, xfs, btrfs, squashfs, erofs (populated), vfat, swap (empty).
    """
    specs = [PartitionSpec(_fs_size(fstype, files), _type_code(fstype, label), _builder(fstype, files))
             for fstype, files in parts]
    return _make_partitioned(path, label, specs)


def make_gpt_image(path: Path, files_p1: dict[str, bytes], files_p2: dict[str, bytes]) -> Path:
    """GPT image: partition 1 ext4 with files_p1, partition 2 xfs (300 MiB, sparse) with files_p2."""
    return make_partitioned_image(path, [("ext4", files_p1), ("xfs", files_p2)])


def make_mbr_image(path: Path, files: dict[str, bytes], logical_files: dict[str, bytes] | None = None) -> Path:
    """MBR image: p1 ext4 with files, p2 an extended partition holding logical p5 ext4 with logical_files."""
    logical = logical_files if logical_files is not None else {"logical.txt": b"logical partition\n"}
    return _make_partitioned(path, "dos", [
        PartitionSpec(_fs_size("ext4", files), "83", _builder("ext4", files)),
        PartitionSpec(16 * MiB, "5"),
        PartitionSpec(14 * MiB, "83", _builder("ext4", logical)),  # logical: lies inside p2
    ])


def make_mixed_image(path: Path, files: dict[str, bytes]) -> Path:
    """GPT image with unmountable neighbours: p1 swap, p2 ext4 with files, p3 vfat (blank without
    dosfstools), p4 blank."""
    vfat = "vfat" if shutil.which("mkfs.vfat") else None
    return make_partitioned_image(path, [("swap", {}), ("ext4", files), (vfat, {}), (None, {})])


def make_blank_partitioned_image(path: Path) -> Path:
    """GPT image whose two partitions hold no filesystem at all."""
    return make_partitioned_image(path, [(None, {}), (None, {})])


def make_whole_disk_ext4(path: Path, files: dict[str, bytes], size: int = 32 * MiB) -> Path:
    """ext4 over the whole file, no partition table."""
    path = Path(path)
    _create_sparse(path, size)
    mkfs_ext4(path, files)
    return path


def make_odd_size_image(path: Path, seed: int = 1) -> Path:
    """5 MiB + 12345 bytes: random, zero and compressible runs, size not a multiple of any block size."""
    rng = random.Random(seed)
    size = 5 * MiB + 12345
    chunks = [rng.randbytes(MiB), bytes(MiB), b"compressible " * (MiB // 13), rng.randbytes(2 * MiB)]
    data = b"".join(chunks)
    data = (data + rng.randbytes(size))[:size]
    path = Path(path)
    path.write_bytes(data)
    return path


def make_sparse_image(path: Path, size: int = 1 << 30) -> Path:
    """A 1 GiB sparse file with a little data at a few (some unaligned) offsets."""
    path = Path(path)
    _create_sparse(path, size)
    rng = random.Random(7)
    with open(path, "r+b") as f:
        for offset in (0, 4096 * 3 + 100, 128 * MiB, 512 * MiB + 1, size - 4096):
            f.seek(offset)
            f.write(rng.randbytes(4096))
    return path


def random_disk(path: Path, data_mib: int, size_mib: int | None = None) -> Path:
    """A disk with data_mib MiB of random (incompressible) data at its start, zeros after it."""
    with open(path, "wb") as f:
        for _ in range(data_mib):
            f.write(os.urandom(MiB))
        f.truncate((size_mib if size_mib is not None else data_mib) * MiB)
    return Path(path)


def make_empty_image(path: Path) -> Path:
    """A 0-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_dirty_image(path: Path, files: dict[str, bytes], fstype: str = "ext4",
                     settled: dict[str, bytes] | None = None) -> Path:
    """Whole-disk ext4/xfs copied while mounted read-write, so its journal needs recovery.

    `settled` files are written and the filesystem unmounted cleanly first, so they are checkpointed
    and read back even when the journal is not replayed; `files` may live only in the journal.
    Needs root and loop devices (it is the one builder that mounts).
    """
    path = Path(path)
    live = path.with_name(path.name + ".live")
    mountpoint = path.with_name(path.name + ".mnt")
    try:
        _create_sparse(live, _fs_size(fstype, {**(settled or {}), **files}))
        _builder(fstype, {})(live)
        if settled:
            with mounted_rw(live, mountpoint) as mnt:
                _write_files(mnt, settled)
        with mounted_rw(live, mountpoint) as mnt:
            _write_files(mnt, files)
            copy_live(live, mnt, path)
    finally:
        live.unlink(missing_ok=True)
    return path


@contextmanager
def mounted_rw(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount a whole-disk image read-write on an autoclear loop device; unmount and rmdir on exit."""
    mountpoint.mkdir()
    try:
        _run(["mount", "-o", "loop", str(image), str(mountpoint)])
        try:
            yield mountpoint
        finally:
            _run(["umount", str(mountpoint)])
    finally:
        mountpoint.rmdir()


def copy_live(live: Path, mountpoint: Path, copy: Path) -> Path:
    """Commit the journal of the fs mounted at mountpoint (checkpoint stays pending), then copy its image."""
    _run(["sync", "-f", str(mountpoint)])
    _create_sparse(copy, live.stat().st_size)
    _copy_sparse(live, copy, 0)
    return copy


def mkfs_ext4(target: Path, files: dict[str, bytes]) -> None:
    """ext4 filling the whole target file, populated from files with `mkfs.ext4 -d` (no mount)."""
    with tempfile.TemporaryDirectory(prefix="ext4-src-", dir=Path(target).parent) as src:
        _write_files(Path(src), files)
        # lazy init: the scratch file is all holes already, so zeroing journal and inode tables only
        # turns holes into written zeros.
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d", src, str(target)])


def mkfs_xfs(target: Path, files: dict[str, bytes]) -> None:
    """xfs filling the whole target file, populated through an mkfs.xfs protofile (no mount)."""
    with tempfile.TemporaryDirectory(prefix="xfs-src-", dir=Path(target).parent) as src:
        root = Path(src) / "root"
        _write_files(root, files)
        proto = Path(src) / "proto"
        proto.write_text("/dev/null\n0 0\nd--755 0 0\n" + _proto_dir(root) + "$\n")
        _run(["mkfs.xfs", "-q", "-f", "-p", str(proto), str(target)])


def mkfs_btrfs(target: Path, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="btrfs-src-", dir=Path(target).parent) as src:
        _write_files(Path(src), files)
        _run(["mkfs.btrfs", "-q", "-f", "--rootdir", src, str(target)])


def mkfs_squashfs(target: Path, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="squashfs-src-", dir=Path(target).parent) as src:
        _write_files(Path(src), files)
        _run(["mksquashfs", src, str(target), "-noappend", "-quiet", "-no-progress"])


def mkfs_erofs(target: Path, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="erofs-src-", dir=Path(target).parent) as src:
        _write_files(Path(src), files)
        _run(["mkfs.erofs", "--quiet", str(target), src])


def mkfs_vfat(target: Path) -> None:
    _run(["mkfs.vfat", str(target)])


def mkswap(target: Path) -> None:
    _run(["mkswap", str(target)])


MKFS_TOOL = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs", "squashfs": "mksquashfs",
             "erofs": "mkfs.erofs", "vfat": "mkfs.vfat", "swap": "mkswap"}


def have_mkfs(fstype: str) -> bool:
    """Whether the tool that builds fstype is installed (btrfs/squashfs/erofs/vfat are optional)."""
    return shutil.which(MKFS_TOOL[fstype]) is not None


def _fs_size(fstype: str | None, files: dict[str, bytes]) -> int:
    """Partition size: the tool's practical minimum, grown with the content."""
    content = sum(len(d) for d in files.values()) * 5 // 4 + len(files) * 8192
    minimum = {"xfs": XFS_SIZE, "btrfs": 128 * MiB, "ext4": EXT4_SIZE, "vfat": 33 * MiB, "swap": 8 * MiB}
    size = max(minimum.get(fstype or "", 4 * MiB), content + 8 * MiB)
    return -(-size // MiB) * MiB


def _type_code(fstype: str | None, label: str) -> str:
    if label == "gpt":
        return {"swap": SWAP_GPT, "vfat": BASIC_DATA_GPT}.get(fstype or "", LINUX_GPT)
    return {"swap": "82", "vfat": "c"}.get(fstype or "", "83")


def _builder(fstype: str | None, files: dict[str, bytes]) -> Callable[[Path], None] | None:
    if fstype is None:
        return None
    if fstype in ("vfat", "swap"):
        if files:
            raise ValueError(f"{fstype} partitions are built empty")
        return mkfs_vfat if fstype == "vfat" else mkswap
    build = {"ext4": mkfs_ext4, "xfs": mkfs_xfs, "btrfs": mkfs_btrfs, "squashfs": mkfs_squashfs,
             "erofs": mkfs_erofs}[fstype]
    return lambda target: build(target, files)


def needs_log_recovery(image: Path, fstype: str) -> bool:
    """Whether a whole-disk ext4/xfs image has a journal/log that mounting would replay."""
    if fstype == "xfs":
        out = subprocess.run(["xfs_logprint", "-t", str(image)], capture_output=True, text=True).stdout
        return "<DIRTY>" in out
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    return "needs_recovery" in out


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file below root (lost+found left out), by relative path: compare with what was written."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and "lost+found" not in p.parts}


def release_kernel_state(under: Path) -> None:
    """Last resort after a failed test: lazily unmount every mount below `under`, free its loop devices."""
    prefix = os.path.realpath(under).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:  # paths escape space etc. as \ooo
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=lambda p: p.count("/"), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    loops, _ = leftover_kernel_state(under)
    for line in loops:
        subprocess.run(["losetup", "-d", line.split()[0]], capture_output=True)


def leftover_kernel_state(under: Path | None = None) -> tuple[list[str], list[str]]:
    """(loop devices, loop/fuse mounts) now present; with `under`, only those involving paths below it.

    Filtering by a test's tmp_path keeps leak checks right when other test runs share the kernel.
    """
    proc = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                          capture_output=True, text=True, check=False)
    loops = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    with open("/proc/mounts", encoding="utf-8") as f:
        mounts = [line.strip() for line in f if line.split()[0].startswith("/dev/loop") or "fuse" in line.split()[2]]
    if under is not None:
        prefix = os.path.realpath(under)
        loops = [line for line in loops if prefix in line]
        loop_names = {line.split()[0] for line in loops}
        mounts = [line for line in mounts if prefix in line or line.split()[0] in loop_names]
    return loops, mounts


def _make_partitioned(path: Path, label: str, specs: list[PartitionSpec]) -> Path:
    """Lay out the table with sfdisk, then build each filesystem in a scratch file and copy it in."""
    path = Path(path)
    script = [f"label: {label}"]
    starts: list[int] = []
    offset = MiB
    extended_end = None
    for spec in specs:
        if label == "dos" and spec.type == "5":
            script.append(f"start={offset // SECTOR}, size={spec.size // SECTOR}, type=5")
            extended_end = offset + spec.size
            starts.append(offset)
            offset += MiB  # first logical partition leaves room for its EBR
            continue
        script.append(f"start={offset // SECTOR}, size={spec.size // SECTOR}, type={spec.type}")
        starts.append(offset)
        offset += spec.size
    total = max(offset, extended_end or 0) + MiB  # room for the backup GPT
    _create_sparse(path, total)
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], stdin="\n".join(script) + "\n")
    for spec, start in zip(specs, starts):
        if spec.build is None:
            continue
        scratch = path.with_name(f"{path.name}.part-{start}")
        try:
            _create_sparse(scratch, spec.size)
            spec.build(scratch)
            _copy_sparse(scratch, path, start)
        finally:
            scratch.unlink(missing_ok=True)
    return path


def _create_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy only src's data extents into dst at offset, so holes stay holes."""
    with open(src, "rb") as s, open(dst, "r+b") as d:
        sfd, dfd = s.fileno(), d.fileno()
        end = os.fstat(sfd).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(sfd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            hole = os.lseek(sfd, pos, os.SEEK_HOLE)
            while pos < hole:
                chunk = os.pread(sfd, min(hole - pos, 4 * MiB), pos)
                os.pwrite(dfd, chunk, offset + pos)
                pos += len(chunk)


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _proto_dir(directory: Path) -> str:
    """mkfs.xfs protofile body for a directory tree (names must not contain whitespace)."""
    lines = []
    for entry in sorted(directory.iterdir()):
        if any(c.isspace() for c in entry.name):
            raise ValueError(f"xfs protofile cannot hold names with whitespace: {entry.name!r}")
        if entry.is_dir():
            lines.append(f"{entry.name} d--755 0 0\n{_proto_dir(entry)}$\n")
        else:
            lines.append(f"{entry.name} ---644 0 0 {entry}\n")
    return "".join(lines)


def _run(cmd: list[str], stdin: str = "") -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
