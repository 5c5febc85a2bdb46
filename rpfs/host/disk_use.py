"""Is a disk in use? Reading one live, or writing one back, is only safe when nothing else uses it.

In use means: a block device that is mounted or held by another device (a loop device, LVM...), an
image file attached to a loop device, or a file or device some other process has open for writing.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from rpfs.host.mountinfo import read_mountinfo


def in_use(path: Path) -> str | None:
    """Why reading this disk live would give a torn copy, or None when nothing uses it."""
    real = os.path.realpath(path)
    mode = os.stat(real).st_mode
    if stat.S_ISBLK(mode):
        if any(os.path.realpath(m.source) == real for m in read_mountinfo() if m.source.startswith("/dev/")):
            return f"{path} is mounted"
        holders = Path("/sys/class/block") / os.path.basename(real) / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            return f"{path} is held by another device"
    else:
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if backing.read_text().strip() == real:
                    return f"{path} is attached to /dev/{backing.parent.parent.name}"
            except OSError:
                continue
    writer = _open_for_writing(real)
    if writer:
        return f"{path} is open for writing by {writer}"
    return None


def users_under(folder: str) -> list[str]:
    """Who keeps a mount busy: processes with a file, folder or mapping under it ('name (pid N)') and loop
    devices over a file in it. Only /proc and /sys are read: nothing under the folder is touched (its
    daemon may be dead)."""
    inside = folder.rstrip("/") + "/"

    def under(name: str) -> bool:
        return name == folder or name.startswith(inside)
    found = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            if under(backing.read_text().strip()):
                found.append(f"/dev/{backing.parent.parent.name}")
        except OSError:
            continue
    for proc in _other_processes():
        try:
            links = [proc / "cwd", proc / "root", *(proc / "fd").iterdir()]
            names = [_link(link) for link in links]
            names += [line.split(None, 5)[5].strip() for line in (proc / "maps").read_text().splitlines()
                      if len(line.split(None, 5)) == 6]
            if any(under(name) for name in names if name):
                found.append(_named(proc))
        except OSError:
            continue   # gone meanwhile, or not ours to read
    return found


def _link(link: Path) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return ""


def _other_processes() -> Iterator[Path]:
    """/proc/PID of every process but this one."""
    me = str(os.getpid())
    return (proc for proc in Path("/proc").iterdir() if proc.name.isdigit() and proc.name != me)


def _named(proc: Path) -> str:
    return f"{(proc / 'comm').read_text().strip()} (pid {proc.name})"


def _open_for_writing(real: str) -> str | None:
    """A process (other than this one) that has the file open for writing, as 'name (pid N)'."""
    for proc in _other_processes():
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    if os.readlink(fd) != real:
                        continue
                    flags = int((proc / "fdinfo" / fd.name).read_text().split("flags:")[1].split()[0], 8)
                except (OSError, IndexError, ValueError):
                    continue
                if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    return _named(proc)
        except OSError:
            continue
    return None
