"""Small files root writes (pid files, records, holds, state): whole or absent, never through a planted link.

A file is written beside its place under a name of this process's own, created O_CREAT|O_EXCL|O_NOFOLLOW
with the narrowest mode, then renamed into place: a reader, or a process killed half-way, never sees
half of it.
"""
from __future__ import annotations

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
    """Write a new file whole and durably; FileExistsError if something is at path (it is never replaced)."""
    unfinished = _write_beside(path, data, mode, durable=True)
    try:
        os.link(unfinished, path)   # unlike a rename, never replaces what is there
    finally:
        unfinished.unlink(missing_ok=True)
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
