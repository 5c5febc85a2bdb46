"""Attach disk images read-only: mount each partition's filesystem through a read-only loop device.

One image attaches at DEST/p<N> (or DEST/disk); a whole VM, one image per disk, at DEST/<disk>/p<N>.

All loop/mount plumbing (losetup, mount, umount, blkid) lives here. Mounts use
`mount -o ro,loop,offset=..,sizelimit=..`: libmount creates a read-only loop device with autoclear,
so umount frees it and a failed mount never leaves one behind. Journals are never replayed, so an
image taken from a live, dirty filesystem mounts as it is and is never written.

DEST and every folder attach makes are 0700: the files of a backed-up disk keep their owners' numbers,
which name other people on this host, so only root reaches them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from rpfs.attach.partitions import read_partitions
from rpfs.errors import RpfsError
from rpfs.host.access import PRIVATE_FOLDER, check_trusted_place, make_private_folder
from rpfs.host.mountinfo import Mount, read_mountinfo
from rpfs.host.tools import error_line, run_tool, run_tool_raw
from rpfs.store.recovery_point import check_name

LOOP_READ_AHEAD_KB = 1024   # one block of a store of the default block size

# Per filesystem: options that keep the mount read-only and stop any journal/log replay.
# nodev,nosuid: a backup's device nodes and setuid binaries must not become usable.
MOUNT_OPTIONS: dict[str, str] = {
    "ext4": "ro,nodev,nosuid,noload",
    "ext3": "ro,nodev,nosuid,noload",
    "ext2": "ro,nodev,nosuid",  # no journal; the ext2 driver rejects noload
    "xfs": "ro,nodev,nosuid,norecovery,nouuid",  # nouuid: the live fs may be mounted with the same UUID
    "btrfs": "ro,nodev,nosuid,rescue=nologreplay",  # same-fsid clones mount since Linux 6.7 (temp-fsid)
    "squashfs": "ro,nodev,nosuid",
    "erofs": "ro,nodev,nosuid",
}
MOUNTED = "mounted"
ATTACH_NAME = re.compile(r"disk|p[0-9]+")   # fullmatch


@dataclass
class AttachedFilesystem:
    """One partition (or the whole disk) of an attached image; status is "mounted" or why not."""

    name: str
    partition: int | None
    fstype: str | None
    mountpoint: str | None
    status: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Target:
    name: str
    partition: int | None
    offset: int
    size: int


def attach(image: Path, dest: Path) -> list[AttachedFilesystem]:
    """Mount every supported filesystem of `image` read-only under `dest` (dest/p<N> or dest/disk)."""
    image = Path(os.path.abspath(image))
    dest = Path(os.path.abspath(dest))
    image_size = _check_image(image)
    created = _prepare_dest(dest, [image])
    try:
        results = _attach_image(image, image_size, dest)
    except BaseException:
        _remove_created(dest, created)
        raise
    if not any(r.status == MOUNTED for r in results):
        _remove_created(dest, created)
        reasons = "; ".join(f"{r.name}: {r.status}" for r in results)
        raise RpfsError(f"no filesystem found in {image} that can be mounted read-only ({reasons})")
    return results


def attach_disks(images: dict[str, Path], dest: Path, require_mountable: bool = True) \
        -> dict[str, list[AttachedFilesystem]]:
    """Whole-VM attach: every filesystem of every disk read-only under dest/<disk> (p<N> or disk).

    A disk with nothing mountable is reported in its list, not fatal, unless no disk mounts anything (and
    require_mountable: a catalog records that as it is).
    An interrupt or unexpected error undoes every mount and directory made so far.
    """
    if not images:
        raise RpfsError("no disks to attach")
    paths = {check_name("disk", name): Path(os.path.abspath(image)) for name, image in images.items()}
    for image in paths.values():
        _check_image_path(image)
    dest = Path(os.path.abspath(dest))
    created = _prepare_dest(dest, list(paths.values()), set(paths))
    results: dict[str, list[AttachedFilesystem]] = {}
    try:
        for name, image in paths.items():
            results[name] = _attach_disk(image, dest / name)
    except BaseException:
        for name, found in results.items():
            for r in found:
                if r.status == MOUNTED and r.mountpoint:
                    _rollback_mount(Path(r.mountpoint))
            _rmdir_quietly(dest / name)
        _remove_created(dest, created)
        raise
    if require_mountable and not any(r.status == MOUNTED for found in results.values() for r in found):
        _remove_created(dest, created)
        reasons = "; ".join(f"{name} {r.name}: {r.status}" for name, found in results.items() for r in found)
        raise RpfsError(f"no filesystem found in any disk that can be mounted read-only ({reasons})")
    return results


def detach(dest: Path, missing_ok: bool = False) -> list[str]:
    """Unmount the filesystems attach or attach_disks mounted below `dest`; remove the directories they made
    (also those an attach or a detach that was killed left empty). Nothing attached is an error, unless
    missing_ok."""
    dest = Path(dest)
    root = os.path.realpath(dest)
    if root == "/":
        raise RpfsError("refusing to detach everything below /")
    # Only what attach makes: mounts named p<N> or disk on read-only loop devices. Other mounts below
    # dest (an rpfs store mount, a network share, a writable loop mount) are not ours to undo.
    mounts = _attach_mounts(root)
    left = _left_folders(Path(root))
    if not mounts and not left and not missing_ok:
        raise RpfsError(f"nothing attached at {dest}")
    for folder in left:
        _remove_mountpoint(folder, Path(root))
    unmounted: list[str] = []
    failures: list[str] = []
    for mount in mounts:
        try:
            _unmount(mount)
        except RpfsError as e:
            failures.append(e.message)
            continue
        unmounted.append(mount.mountpoint)
        if mount.mountpoint != root:
            _remove_mountpoint(Path(mount.mountpoint), Path(root))
    if failures:
        raise RpfsError("; ".join(failures))
    return unmounted


def has_attached(dest: Path) -> bool:
    """Something attach made is mounted below dest."""
    return bool(_attach_mounts(os.path.realpath(dest)))


def _attach_mounts(root: str) -> list[Mount]:
    return [m for m in _mounts_under(root) if _is_attach_mount(m)]


def _attach_image(image: Path, image_size: int, dest: Path) -> list[AttachedFilesystem]:
    """Per-image work, so a whole-VM attach can call it per disk; undoes its mounts if interrupted."""
    partitions = read_partitions(image)
    if partitions:
        targets = [_Target(f"p{p.number}", p.number, p.start, p.size) for p in partitions]
    else:
        targets = [_Target("disk", None, 0, image_size)]
    results: list[AttachedFilesystem] = []
    try:
        for target in targets:
            results.append(_attach_target(image, target, dest))
    except BaseException:
        for r in results:
            if r.status == MOUNTED and r.mountpoint:
                _rollback_mount(Path(r.mountpoint))
        raise
    return results


def _attach_disk(image: Path, disk_dir: Path) -> list[AttachedFilesystem]:
    """One disk of a whole-VM attach: a disk that cannot be read is reported as its whole-disk status.

    disk_dir stays only while something is mounted in it (an attach run again finds it made already).
    """
    disk_dir.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)
    size = 0
    try:
        try:
            size = _image_size(image)
            found = _attach_image(image, size, disk_dir)
        except RpfsError as e:
            found = [AttachedFilesystem("disk", None, None, None, e.message, 0, size)]
    except BaseException:
        _rmdir_quietly(disk_dir)  # _attach_image has undone its own mounts
        raise
    if not any(r.status == MOUNTED for r in found):
        disk_dir.rmdir()
    return found


def _attach_target(image: Path, target: _Target, dest: Path) -> AttachedFilesystem:
    result = AttachedFilesystem(target.name, target.partition, None, None, "", target.offset, target.size)
    mountpoint = dest / target.name
    here = _attach_mount_at(mountpoint)
    if here is not None:   # mounted by an earlier run of this attach (one that was killed, maybe)
        if _loop_of(here) != (os.path.realpath(image), target.offset):
            raise RpfsError(f"{mountpoint} has another filesystem attached; rpfs detach {dest} first")
        result.fstype, result.mountpoint, result.status = here.fstype, str(mountpoint), MOUNTED
        return result
    fstype, reason = _probe(image, target.offset, target.size)
    result.fstype = fstype
    if reason or fstype is None:
        result.status = reason or "no filesystem detected"
        return result
    mountpoint.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)   # left empty by an earlier run, killed before it mounted
    try:
        options = f"{MOUNT_OPTIONS[fstype]},loop,offset={target.offset},sizelimit={target.size}"
        run_tool(["mount", "-t", fstype, "-o", options, str(image), str(mountpoint)])
    except RpfsError as e:
        if os.path.ismount(mountpoint):  # mount timed out after mounting: undo it
            _rollback_mount(mountpoint)
        else:
            mountpoint.rmdir()
        result.status = f"mount failed: {e.message}"
        return result
    except BaseException:
        _rollback_mount(mountpoint)
        raise
    mounted = _attach_mount_at(mountpoint)
    if mounted is not None:
        _tune_loop(mounted)
    result.mountpoint = str(mountpoint)
    result.status = MOUNTED
    return result


def _tune_loop(mount: Mount) -> None:
    """Best effort, once mounted: direct I/O, so the loop device does not keep a second copy of what the
    image's own file (an rpfs mount's page cache, say) keeps already, and a read-ahead of LOOP_READ_AHEAD_KB,
    so a reader copying files out asks the image in large requests (the kernel's default is 128 KiB)."""
    loop = re.fullmatch(r"/dev/(loop\d+)", mount.source)
    if loop is None:
        return
    run_tool_raw(["losetup", "--direct-io=on", mount.source])   # refused on some files: stays buffered
    try:
        Path(f"/sys/block/{loop.group(1)}/queue/read_ahead_kb").write_text(str(LOOP_READ_AHEAD_KB))
    except OSError:
        pass


def _probe(image: Path, offset: int, size: int) -> tuple[str | None, str | None]:
    """(fstype, None) when blkid finds a filesystem, else (type or None, reason it is skipped)."""
    if size <= 0:
        return None, "empty (0 bytes)"
    cmd = ["blkid", "-p", "-o", "export", "-O", str(offset), "-S", str(size), str(image)]
    proc = run_tool_raw(cmd)
    if proc.returncode == 2:
        return None, "no filesystem detected"
    if proc.returncode == 8:
        return None, "ambiguous: several filesystem signatures found"
    if proc.returncode != 0:
        return None, f"probe failed: {error_line(proc.stderr) or f'blkid exit code {proc.returncode}'}"
    tags = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    fstype = tags.get("TYPE")
    if not fstype:
        what = tags.get("PTTYPE")
        return None, f"no filesystem detected (nested {what} partition table)" if what else "no filesystem detected"
    if fstype not in MOUNT_OPTIONS:
        return fstype, f"unsupported filesystem {fstype}"
    return fstype, None


def _check_image(image: Path) -> int:
    """Size of a readable image file or block device; RpfsError otherwise."""
    _check_image_path(image)
    return _image_size(image)


def _check_image_path(image: Path) -> None:
    if not image.exists():
        raise RpfsError(f"image {image} does not exist")
    if image.is_dir():
        raise RpfsError(f"image {image} is a directory")


def _image_size(image: Path) -> int:
    try:
        with open(image, "rb") as f:
            f.read(512)
            return f.seek(0, os.SEEK_END)
    except OSError as e:
        raise RpfsError(f"cannot read image {image}: {e.strerror or e}") from None


def _prepare_dest(dest: Path, images: list[Path], disk_names: Collection[str] = ()) -> Path | None:
    """Make sure dest is an empty directory, or holds only what an attach of these same images made there
    (the same attach, run again after a kill or not: it completes, and gives the same answer); return the
    topmost directory we created, if any."""
    check_trusted_place(dest, "attach destination", private=True)   # never a link: the folder is tightened and mounted over
    if dest.exists():
        if not dest.is_dir():
            raise RpfsError(f"{dest} exists and is not a directory")
        if os.path.ismount(dest):
            raise RpfsError(f"{dest} is a mountpoint; choose an empty directory")
        sources = {os.path.realpath(image) for image in images}
        mounts = _mounts_under(os.path.realpath(dest))
        if any(not _is_attach_mount(m) or _loop_of(m)[0] not in sources for m in mounts):
            raise RpfsError(f"{dest} already has something attached; detach it first")
        if not all(_made_by_attach(path, disk_names) for path in dest.iterdir()):
            raise RpfsError(f"{dest} is not empty; choose an empty directory")
        make_private_folder(dest, "attach destination")   # before anything is mounted in it
        return None
    topmost = dest
    while not topmost.parent.exists():
        topmost = topmost.parent
    try:
        make_private_folder(dest, "attach destination")
    except OSError as e:
        raise RpfsError(f"cannot create {dest}: {e.strerror or e}") from None
    return topmost


def _remove_created(dest: Path, topmost: Path | None) -> None:
    """Remove the directories attach created (dest up to topmost), only while they are empty."""
    if topmost is None:
        return
    path = dest
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == topmost:
            return
        path = path.parent


def _rollback_mount(mountpoint: Path) -> None:
    """Best-effort undo of one of our mounts while another error is already on its way out."""
    try:
        run_tool(["umount", str(mountpoint)])
    except RpfsError:
        pass
    _rmdir_quietly(mountpoint)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _made_by_attach(path: Path, disk_names: Collection[str]) -> bool:
    """A folder below DEST that attach makes: p<N> or disk, mounted or empty; or, for a whole VM, a disk's
    folder holding only those."""
    if path.is_symlink() or not path.is_dir():
        return False
    if ATTACH_NAME.fullmatch(path.name) and (os.path.ismount(path) or not any(path.iterdir())):
        return True
    return path.name in disk_names and not os.path.ismount(path) and \
        all(_made_by_attach(inner, ()) for inner in path.iterdir())


def _left_folders(root: Path) -> list[Path]:
    """Empty folders named p<N> or disk, below root or below a disk's folder in it, that nothing is mounted
    on: left by an attach or a detach that was killed between a folder and its mount."""
    found = []
    try:
        for path in root.iterdir():
            if path.is_symlink() or not path.is_dir() or os.path.ismount(path):
                continue
            inner = list(path.iterdir())
            if not inner and ATTACH_NAME.fullmatch(path.name):
                found.append(path)
            found += [p for p in inner if ATTACH_NAME.fullmatch(p.name) and not p.is_symlink() and p.is_dir()
                      and not os.path.ismount(p) and not any(p.iterdir())]
    except OSError:
        pass   # not a folder, or one that cannot be read: nothing of attach's to find there
    return found


def _loop_of(mount: Mount) -> tuple[str, int]:
    """(backing file, offset) of the loop device an attach mount reads; ("", -1) if it cannot be told."""
    loop = re.fullmatch(r"/dev/(loop\d+)", mount.source)
    folder = Path("/sys/block") / (loop.group(1) if loop else "-") / "loop"
    try:
        return (folder / "backing_file").read_text().rstrip("\n"), int((folder / "offset").read_text())
    except (OSError, ValueError):
        return "", -1


def _attach_mount_at(mountpoint: Path) -> Mount | None:
    root = os.path.realpath(mountpoint)
    return next((m for m in _attach_mounts(root) if m.mountpoint == root), None)


def _is_attach_mount(mount: Mount) -> bool:
    """What attach makes: a mount named p<N> or disk whose source is a read-only loop device."""
    loop = re.fullmatch(r"/dev/(loop\d+)", mount.source)
    if loop is None or not ATTACH_NAME.fullmatch(os.path.basename(mount.mountpoint)):
        return False
    try:
        return (Path("/sys/block") / loop.group(1) / "ro").read_text().strip() == "1"
    except OSError:
        return False


def _unmount(mount: Mount) -> None:
    """Unmount one mount; free its loop device if the kernel will not auto-clear it."""
    run_tool(["umount", mount.mountpoint])
    loop = re.fullmatch(r"/dev/(loop\d+)", mount.source)
    if loop is None:
        return
    sysdir = Path("/sys/block") / loop.group(1) / "loop"
    try:
        autoclear = (sysdir / "autoclear").read_text().strip() == "1"
    except OSError:
        return  # already gone: auto-cleared
    still_used = any(m.source == mount.source for m in read_mountinfo())
    if not autoclear and not still_used:
        run_tool(["losetup", "-d", mount.source])


def _remove_mountpoint(mountpoint: Path, root: Path) -> None:
    """rmdir a mountpoint attach created (p<N>/disk) and then empty parents up to, not including, root."""
    if not ATTACH_NAME.fullmatch(mountpoint.name):
        return
    path = mountpoint
    while path != root and root in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def _mounts_under(root: str) -> list[Mount]:
    """Mounts at or below root, in unmount order: deepest first, later (upper) stacked mounts first."""
    prefix = root.rstrip("/") + "/"
    found = [(i, m) for i, m in enumerate(read_mountinfo())
             if m.mountpoint == root or m.mountpoint.startswith(prefix)]
    found.sort(key=lambda im: (im[1].mountpoint.count("/"), im[0]), reverse=True)
    return [m for _, m in found]
