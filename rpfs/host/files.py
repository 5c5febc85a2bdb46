"""Small files root writes (pid files, records, holds, state): whole or absent, never through a planted link.

A file is written beside its place under a name of this process's own, created O_CREAT|O_EXCL|O_NOFOLLOW
with the narrowest mode, then renamed into place: a reader, or a process killed half-way, never sees
half of it.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


def write_whole(path: Path, data: bytes, mode: int = 0o600, durable: bool = False) -> None:
    """Write path whole; durable also syncs the data and the folder (it must survive a crash)."""
    unfinished = _write_beside(path, data, mode, durable)
    try:
        os.replace(unfinished, path)
    except BaseException:
        unfinished.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def create_whole(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a new file whole and durably; FileExistsError if something is at path (it is never replaced).

    The file has no name until it is whole (O_TMPFILE, then linked in), so a kill leaves nothing behind,
    not even a secret in a temporary file; filesystems without O_TMPFILE get a temporary name beside it."""
    try:
        fd = os.open(path.parent, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, mode)
    except IsADirectoryError:   # what the kernel says when the filesystem has no O_TMPFILE
        fd = -1
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        fd = -1
    if fd < 0:
        unfinished = _write_beside(path, data, mode, durable=True)
        try:
            os.link(unfinished, path)   # unlike a rename, never replaces what is there
        finally:
            unfinished.unlink(missing_ok=True)
    else:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.write(fd, data)
            os.fsync(fd)
            # linkat(AT_SYMLINK_FOLLOW) gives the whole file its name; Python uses it only given a dir fd
            os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder)
        finally:
            os.close(fd)
            os.close(folder)
    fsync_folder(path.parent)


def _write_beside(path: Path, data: bytes, mode: int, durable: bool) -> Path:
    """data in a new file beside path, under a name of this process's own."""
    unfinished = path.with_name(f".{path.name}.{os.getpid()}")
    unfinished.unlink(missing_ok=True)   # left by a killed process that had this pid
    fd = os.open(unfinished, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        unfinished.unlink(missing_ok=True)
        raise
    return unfinished


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in folder survive a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
