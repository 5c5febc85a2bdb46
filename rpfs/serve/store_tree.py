"""The read-only FUSE filesystem: MOUNT/<vm>/<recovery point>/<disk>.img and MOUNT/<vm>/latest.

Handlers only translate paths and calls into catalog lookups and ImageReader reads; fuse_errors turns
any other exception into EIO.

Access: images and info.json are 0440, folders 0550, all of the daemon's user (root) and of one group: its
own, or the group `rpfs mount --allow-group` names. The mount has allow_other only with a group, and the kernel checks
these modes (default_permissions), so a member reads and everyone else gets EACCES.

Concurrency: pyfuse3 runs handlers as trio tasks. Reads whose blocks are all cached (or holes) are
answered inline; the rest go to worker threads (decompression and hashing release the GIL), bounded by
a CapacityLimiter: whole blocks, cached, for sequential readers; only the frames a random read needs.
Inode numbers are handed out on first lookup and never reused (so images are opened with keep_cache);
the table grows with the number of recovery points seen, not with disk size.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime

import pyfuse3
import trio

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.serve.fuse_errors import fuse_errors
from rpfs.serve.image import BlockCache, ImageReader
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.source import PointKeeper, RecoverySource

IMAGE_SUFFIX = ".img"
LATEST = "latest"
INFO = "info.json"       # beside the images: the recovery point's record (consistency, scripts, freeze)
STABLE_TIMEOUT = 300.0   # recovery points never change: the kernel may cache their entries
LIVE_TIMEOUT = 1.0       # VM folders and `latest` change as backups land
READ_AHEAD_BLOCKS = 2    # blocks decoded ahead of a sequential reader, on the other core
FILE_MODE = 0o440        # root and the allowed group read; nobody writes (the mount is read-only)
FOLDER_MODE = 0o550


@dataclass(frozen=True)
class Node:
    """What an inode stands for: the root, a VM folder, a recovery point folder, an image, or `latest`."""
    kind: str                 # "root" | "vm" | "point" | "image" | "latest" | "info"
    vm: str = ""
    point_id: str = ""
    disk: str = ""


def _info(point: RecoveryPoint) -> bytes:
    return json.dumps(point.to_dict(), indent=2, sort_keys=True).encode() + b"\n"


def _ns(iso_time: str) -> int:
    return int(datetime.fromisoformat(iso_time).timestamp() * 1e9)


class RecoveryPointFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, store: RecoverySource, cache: BlockCache, read_threads: int = 4,
                 keeper: PointKeeper | None = None, group: int | None = None):
        """keeper: keeps the points with an image open (None: none can be kept, on read-only media); group:
        the group that may read (the mount has allow_other then); None: the daemon's own."""
        super().__init__()
        self.store, self.cache, self.keeper = store, cache, keeper
        self.owner, self.group = os.geteuid(), os.getegid() if group is None else group
        self._inodes: dict[Node, int] = {Node("root"): pyfuse3.ROOT_INODE}
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node("root")}
        self._points: dict[tuple[str, str], RecoveryPoint] = {}   # immutable once created
        self._readers: dict[int, ImageReader] = {}
        self._infos: dict[int, bytes] = {}
        self._open_images: dict[tuple[str, str], int] = {}      # (vm, point) -> open handles
        self._limiter = trio.CapacityLimiter(read_threads)
        self._loading: dict[tuple[int, int], trio.Event] = {}    # blocks being decoded right now
        self._last_block: dict[int, int] = {}                    # per open image: last block read
        self._nursery: trio.Nursery | None = None                # set by the mount loop, for read-ahead
        self._mounted_ns = int(datetime.now().timestamp() * 1e9)

    def start_read_ahead(self, nursery: trio.Nursery) -> None:
        """Read-ahead tasks run in the mount loop's nursery; without one, reads simply don't read ahead."""
        self._nursery = nursery

    # -- the tree ---------------------------------------------------------------------------------
    def _inode(self, node: Node) -> int:
        inode = self._inodes.get(node)
        if inode is None:
            inode = self._inodes[node] = len(self._nodes) + pyfuse3.ROOT_INODE
            self._nodes[inode] = node
        return inode

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _point(self, vm: str, point_id: str) -> RecoveryPoint:
        point = self._points.get((vm, point_id))
        if point is None:
            point = self._points[(vm, point_id)] = self.store.point(vm, point_id)
        return point

    def _latest_id(self, vm: str) -> str:
        latest = self.store.latest_point_id(vm)
        if latest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)   # its last point was pruned
        return latest

    def _children(self, node: Node) -> list[tuple[str, Node]]:
        if node.kind == "root":
            return [(vm, Node("vm", vm)) for vm in self.store.vms()]
        if node.kind == "vm":
            ids = self.store.point_ids(node.vm)   # keys only: records are read once, by _point
            children = [(point_id, Node("point", node.vm, point_id)) for point_id in ids]
            return children + ([(LATEST, Node("latest", node.vm))] if ids else [])
        if node.kind == "point":
            point = self._point(node.vm, node.point_id)
            images = [(d.name + IMAGE_SUFFIX, Node("image", node.vm, node.point_id, d.name)) for d in point.disks]
            return images + [(INFO, Node("info", node.vm, node.point_id))]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _child(self, node: Node, name: str) -> Node:
        try:
            return self._lookup_child(node, name)
        except CorruptBlockError:
            raise   # the store could not be read: EIO (fuse_errors), not "no such file"
        except RpfsError:  # an unknown VM, recovery point or disk: a plain "no such file"
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _lookup_child(self, node: Node, name: str) -> Node:
        if node.kind == "root":
            if self.store.latest_point_id(name) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return Node("vm", name)
        if node.kind == "vm":
            if name == LATEST:
                self._latest_id(node.vm)
                return Node("latest", node.vm)
            return Node("point", node.vm, self._point(node.vm, name).id)
        if node.kind == "point":
            if name == INFO:
                return Node("info", node.vm, self._point(node.vm, node.point_id).id)
            if name.endswith(IMAGE_SUFFIX):
                disk = self._point(node.vm, node.point_id).disk(name[:-len(IMAGE_SUFFIX)])
                return Node("image", node.vm, node.point_id, disk.name)
            raise pyfuse3.FUSEError(errno.ENOENT)
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self._inode(node)
        attrs.st_uid, attrs.st_gid = self.owner, self.group
        attrs.st_blksize = 1 << 20
        mtime = self._mounted_ns
        timeout = LIVE_TIMEOUT
        if node.kind == "image":
            point = self._point(node.vm, node.point_id)
            size = point.disk(node.disk).size
            attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | FILE_MODE, 1, size
            attrs.st_blocks = -(-_stored(point.disk(node.disk)) // 512)
            mtime, timeout = _ns(point.time), STABLE_TIMEOUT
        elif node.kind == "info":
            point = self._point(node.vm, node.point_id)
            attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | FILE_MODE, 1, len(_info(point))
            mtime, timeout = _ns(point.time), STABLE_TIMEOUT
        elif node.kind == "latest":
            attrs.st_mode, attrs.st_nlink = stat.S_IFLNK | 0o777, 1
            attrs.st_size = len(self._latest_id(node.vm))
            timeout = 0.0
        else:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | FOLDER_MODE, 2
            if node.kind == "point":
                mtime, timeout = _ns(self._point(node.vm, node.point_id).time), STABLE_TIMEOUT
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        attrs.entry_timeout = attrs.attr_timeout = timeout
        return attrs

    # -- handlers ---------------------------------------------------------------------------------
    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        name = os.fsdecode(name)
        node = self._node(parent_inode)
        if name == ".":
            return self._attrs(node)
        return self._attrs(self._child(node, name))

    @fuse_errors
    async def opendir(self, inode, ctx):
        if self._node(inode).kind in ("image", "latest"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        children = self._children(self._node(fh))
        for i in range(start_id, len(children)):
            name, child = children[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(child), i + 1):
                break

    @fuse_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if node.kind != "latest":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(self._latest_id(node.vm))

    @fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.kind not in ("image", "info"):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.kind == "info":
            self._infos[inode] = _info(self._point(node.vm, node.point_id))
            return pyfuse3.FileInfo(fh=inode, keep_cache=False)
        if inode not in self._readers:
            point = self._point(node.vm, node.point_id)
            self._readers[inode] = ImageReader(self.store, self.cache, node.vm, node.point_id,
                                               point.disk(node.disk))
        key = (node.vm, node.point_id)
        # Counted before the point is kept: a release of another handle meanwhile must not drop it.
        self._open_images[key] = self._open_images.get(key, 0) + 1
        if self.keeper is not None:   # prune must not delete a recovery point while it is open
            try:   # on a thread: a lease's gate waits (flock) while a prune deletes, and the FUSE loop must not
                await trio.to_thread.run_sync(self.keeper.take, *key)
            except BaseException as e:
                self._open_images[key] -= 1
                if self._open_images[key] == 0:
                    del self._open_images[key]
                if isinstance(e, RpfsError) and not isinstance(e, CorruptBlockError):
                    raise pyfuse3.FUSEError(errno.ENOENT) from None   # pruned just now
                raise
        # keep_cache: an image's bytes never change under its inode (recovery points are immutable and an
        # inode is never given to another node), and what the page cache holds was checked when the daemon
        # decoded it, so a re-read is served by the kernel (cat warm: the page cache, not a decode).
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_errors
    async def read(self, fh, off, size):
        if fh in self._infos:
            return self._infos[fh][off:off + size]
        reader = self._readers[fh]
        blocks = reader.blocks(off, size)
        sequential = False
        if blocks:
            last = self._last_block.get(fh, -2)
            sequential = blocks[0] in (last, last + 1)
            if sequential and blocks[-1] > last and self._nursery is not None:
                # A sequential reader entered a new block: decode the next ones on the other core.
                for ahead in range(blocks[-1] + 1, min(blocks[-1] + 1 + READ_AHEAD_BLOCKS, reader.block_count)):
                    self._nursery.start_soon(self._load_quietly, fh, ahead)
            self._last_block[fh] = blocks[-1]
        data = reader.read_cached(off, size)
        if data is None and sequential:   # whole blocks, cached for the reads that follow
            try:
                for index in blocks:
                    await self._load(fh, index)
                data = reader.read_cached(off, size)  # None only if a tiny cache evicted a block meanwhile
            except CorruptBlockError:
                pass   # a damaged frame: read only the frames asked for, so that only its range fails
        if data is None:
            # A random read: decode only the frames it needs; a whole block would cost 16 times as much.
            data = await trio.to_thread.run_sync(reader.read_frames, off, size, limiter=self._limiter)
        return data

    async def _load(self, fh: int, index: int) -> None:
        """Bring one block into the cache, on a worker thread, once even if several reads want it."""
        reader = self._readers[fh]
        if reader.peek(index) is not None:
            return
        key = (fh, index)
        loading = self._loading.get(key)
        if loading is not None:
            await loading.wait()
            return
        self._loading[key] = done = trio.Event()
        try:
            await trio.to_thread.run_sync(reader.load, index, limiter=self._limiter)
        finally:
            del self._loading[key]
            done.set()

    async def _load_quietly(self, fh: int, index: int) -> None:
        """Read-ahead for sequential readers: a failure here is reported by the real read later."""
        try:
            await self._load(fh, index)
        except Exception:
            pass

    @fuse_errors
    async def release(self, fh):
        node = self._node(fh)
        if node.kind != "image":
            return
        key = (node.vm, node.point_id)
        self._open_images[key] -= 1
        if self._open_images[key] == 0:
            del self._open_images[key]
            if self.keeper is not None:
                self.keeper.remove(*key)

    async def releasedir(self, fh):
        pass

    @fuse_errors
    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = self.store.stored_bytes() // 4096
        stats.f_bfree = stats.f_bavail = 0
        stats.f_namemax = 255
        return stats


def _stored(disk) -> int:
    """What an image takes: the bytes the store holds for its blocks, holes nothing (so `du` adds up what
    is stored, and `cp --sparse=auto` sees a sparse file and leaves holes where the image reads zeros);
    a point recorded before stored sizes were: its bytes that are not holes. Never more than its size."""
    stored = disk.stored_bytes or disk.size - disk.zero_blocks * disk.block_size
    return max(0, min(stored, disk.size))
