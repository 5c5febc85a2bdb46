"""A FUSE filesystem of one writable file: the image an instant restore serves while it copies.

What the file holds is the WritableFile's business (restore/writable_image.py); these handlers only pass
reads, writes and fsyncs through, on worker threads, and keep the file at its size (a disk cannot grow).
The image is root's alone (0600, folder 0700, and the mount has no allow_other): qemu runs as root.
"""
from __future__ import annotations

import errno
import os
import stat
from datetime import datetime
from typing import Protocol

import pyfuse3
import trio

from rpfs.serve.fuse_errors import fuse_errors

ATTR_TIMEOUT = 300.0   # the file's size never changes


class WritableFile(Protocol):
    size: int

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> int: ...

    def fsync(self) -> None: ...


class WritableImageFS(pyfuse3.Operations):
    """One writable file, MOUNT/<name>; reads and writes go to worker threads (they may decode a block
    or wait for fdatasync)."""

    IMAGE_INODE = pyfuse3.ROOT_INODE + 1

    def __init__(self, image: WritableFile, name: str):
        super().__init__()
        self.image, self.name = image, os.fsencode(name)
        self._limiter = trio.CapacityLimiter(4)
        self._started_ns = int(datetime.now().timestamp() * 1e9)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o700, 2
        elif inode == self.IMAGE_INODE:
            attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | 0o600, 1, self.image.size
            attrs.st_blocks = -(-self.image.size // 512)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_blksize = 1 << 20
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._started_ns
        attrs.entry_timeout = attrs.attr_timeout = ATTR_TIMEOUT
        return attrs

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.IMAGE_INODE)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and attr.st_size != self.image.size:
            raise pyfuse3.FUSEError(errno.EPERM)   # a disk keeps its size
        return self._attrs(inode)

    @fuse_errors
    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(self.IMAGE_INODE), 1)

    @fuse_errors
    async def open(self, inode, flags, ctx):
        if inode != self.IMAGE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_errors
    async def read(self, fh, off, size):
        return await trio.to_thread.run_sync(self.image.read, off, size, limiter=self._limiter)

    @fuse_errors
    async def write(self, fh, off, buf):
        if off + len(buf) > self.image.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return await trio.to_thread.run_sync(self.image.write, off, buf, limiter=self._limiter)

    @fuse_errors
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(self.image.fsync, limiter=self._limiter)

    @fuse_errors
    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    async def releasedir(self, fh):
        pass
