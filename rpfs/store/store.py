"""The store: one directory holding an LMDB environment with blocks by digest and the recovery-point catalog.

Layout (format version 6), one LMDB environment `STORE/data.mdb` with named databases:
  meta     b"format_version" -> b"6", b"block_size" -> decimal bytes, b"created" -> ISO time,
           b"zstd_level" -> decimal (used by writers only; any level decodes the same way),
           b"last_point_id\0<vm>" -> the newest recovery point id the VM was given (never reused),
           b"encryption" -> b"aes-256-gcm" or b"none", b"block_id" -> b"blake3-keyed" or b"blake3",
           b"store_id" -> 16 random bytes (hex), b"key_check" -> hex (encrypted stores; crypto.py),
           b"blob_sizes" -> b"all" (made at format 5: every blob has its record in `sizes`)
  blocks   block id (32 bytes) -> blob (blob.py: 64 KiB frames since format 4; sealed when encrypted,
           since format 6 under a key of its block's own: crypto.py)
  sizes    block id -> "<II" little-endian: the blob's stored and raw length (since format 5), so that
           what a backup, gc or usage counts is looked up in small records: py-lmdb touches every page
           of a value it returns (its "preload"), so a length taken from `blocks` reads the whole blob
  points   b"<vm>\\0<rp id>" -> recovery point JSON (recovery_point.py), sealed when encrypted
  maps     b"<vm>\\0<rp id>\\0<disk>" -> the index of a block map (32-byte block id per block, zeros for
           a hole), kept in content-addressed pieces shared between points (block_maps.py)
  pieces   piece id -> MAP_PIECE entries of block maps;  piece_refs piece id -> u32: indexes naming it
  refs     block id -> u32 little-endian: how many pieces name the block
  policies b"<name>" -> policy JSON; protected b"<vm>" -> protection JSON; jobs b"<id>" -> job JSON,
           each sealed when encrypted
  keys     b"<slot id>" -> key slot JSON (key_slots.py): the master key, wrapped for each way in
When encrypted, VM names, recovery point ids, disk names, policy names and job ids (the keys) stay
readable, and so do block sizes and how many blocks are shared; every value is sealed or keyed.
Older versions, what they lack, their upgrade and the refusal of unknown ones: formats.py.

Every transaction is short: readers hold one for one lookup, so LMDB can reuse freed pages.

The store is root's alone: its folder is 0700 and its files 0600 (LMDB creates its files with the mode it
is given), so no other user can read a block or open, and so flock, a lock file. A store made by an
older rpfs is tightened by the next command that opens it for writing.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import struct
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, TypeVar

import lmdb

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.access import PRIVATE_FILE, check_own_entry, check_trusted_place, make_private, make_private_folder, \
    permission_denied
from rpfs.host.untrusted import parse_json
from rpfs.store.blob import DEFAULT_ZSTD_LEVEL, BlockCodec, read_header
from rpfs.store.block_maps import MAP_PIECE, REF, BlockMaps, count_references, flat_map_piece
from rpfs.store.catalogs import Catalog, Catalogs, CatalogView, Entry, RefRepair, decode_listing
from rpfs.store.crypto import Keyring
from rpfs.store.formats import DB_NAMES, FORMAT_VERSION, MAP_LAYOUT, PIECES_VERSIONS, V1_DB_NAMES, db_names, \
    refuse_unreadable, upgrade
from rpfs.store.key_slots import KeyChoice, KeyLock, KeySlot, NewSlot, new_master_key
from rpfs.store.leases import KeptByLeases
from rpfs.store.recovery_point import DIGEST_SIZE, RecoveryPoint
from rpfs.store.source import RecoverySource

ENCRYPTION = "aes-256-gcm"
MIN_ENCRYPTED_BLOCK_SIZE = 64 << 10   # 2^32 random GCM nonces per key (NIST): the records key seals one per new
                                      # map piece, which needs a changed block: 256 TiB changed at 64 KiB at worst
DEFAULT_BLOCK_SIZE = 1 << 20
INITIAL_MAP_SIZE = 1 << 30
WRITER_WAIT_SECONDS = 600  # how long a backup waits for a running prune or gc, and they for each other
LOW_SPACE = 128 << 20      # below this much free space, a failed write is taken for a full disk
SIZES = struct.Struct("<II")   # a blob's stored and raw length, in `sizes`
LAST_POINT_ID = b"last_point_id\0"   # + VM name, in meta: ids are never given twice (recovery_point.py)
T = TypeVar("T")
DatabaseError = lmdb.Error   # what LMDB raises (a damaged page, a full reader table): the layers above catch
                             # this name, so that only the store knows its database is LMDB


def _is_disk_full(e: lmdb.Error) -> bool:
    return isinstance(e, lmdb.DiskError) or "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC


def _check_lmdb_files(path: Path) -> None:
    """LMDB opens lock.mdb (read-only commands too) and data.mdb read-write, creating them, and follows links:
    each must be absent or a regular file of root's, or root would write its header where a link points."""
    for name in ("data.mdb", "lock.mdb"):
        check_own_entry(path / name, f"store {path}")


class Store(KeptByLeases):
    """A handle on one store directory. Thread-safe: any thread may read; one writer (see writer_lock)."""

    parallel_reads: int | None = None   # blocks a restore reads at once (None: one per core; a vault: more)
    kept_snapshots = True               # a restore may clone a point's kept reflink snapshot (source.py)

    def __init__(self, path: Path, env: lmdb.Environment, readonly: bool, keys: KeyChoice | None = None,
                 unlock: bool = True):
        self.path = path
        self.readonly = readonly
        self._env = env
        self._open_fd = _hold_open_lock(path)
        # Every transaction is taken under this lock's shared side, resizing the map under its exclusive
        # side: LMDB refuses set_mapsize while any transaction of this process is open.
        self._resize_lock = threading.Lock()
        self._txn_count = 0
        self._txn_idle = threading.Condition(self._resize_lock)
        self._pieces = MapPieces()
        try:
            self._open(readonly, keys, unlock)
        except BaseException:   # not a store this rpfs reads, or not the key: nothing stays open
            self.close()
            raise

    def _open(self, readonly: bool, keys: KeyChoice | None, unlock: bool) -> None:
        """Read the meta (upgrading a version 1 store opened for writing) and unlock an encrypted store."""
        path = self.path
        self._dbs = self._open_dbs(V1_DB_NAMES)
        with self.read() as txn:
            meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._dbs["meta"])}
        version = int(meta.get(b"format_version", b"0"))
        refuse_unreadable(path, version, meta)
        self._dbs.update(self._open_dbs(db_names(version)[len(V1_DB_NAMES):]))
        if version < FORMAT_VERSION and not readonly:
            upgrade(self, version)
            if version not in PIECES_VERSIONS:
                meta[b"map_layout"] = MAP_LAYOUT.encode()   # what the upgrade wrote
            version = FORMAT_VERSION
        self.format_version = version   # a version 1 store opened read-only is read as it is
        self._all_sizes = meta.get(b"blob_sizes") == b"all"   # made at format 5: no blob lacks a size record
        self.block_size = int(meta[b"block_size"])
        self.zstd_level = int(meta.get(b"zstd_level", DEFAULT_ZSTD_LEVEL))
        self.meta = {k.decode(): v.decode(errors="replace") for k, v in meta.items() if not k.startswith(LAST_POINT_ID)}
        self.encryption = self.meta.get("encryption", "none")
        if self.encryption not in ("none", ENCRYPTION):
            raise RpfsError(f"store {path} is encrypted with {self.encryption!r}, which this rpfs does not know"
                            " (use a matching rpfs release)")
        self.encrypted = self.encryption != "none"
        try:
            self.store_id = bytes.fromhex(self.meta.get("store_id", ""))
        except ValueError:
            raise RpfsError(f"store {path}: its id in meta is damaged") from None
        if not self.encrypted and ("key_check" in self.meta or (version in PIECES_VERSIONS and self.key_lock().slots)):
            raise RpfsError(f"store {path} says it is not encrypted, but it has key slots: its settings were changed"
                            " or damaged; it is not opened (rpfs info shows them)")
        if not self.encrypted and unlock and keys is not None and keys.given:
            raise RpfsError(f"store {path} says it is not encrypted, but a key was given (a key file, passphrase or"
                            " master key): refused, since its settings may have been changed to write backups in"
                            " the clear (rpfs info); give no key (no --key-file, RPFS_KEY_FILE or RPFS_PASSPHRASE)"
                            " if it is meant to be unencrypted")
        self.keyring: Keyring | None = None
        if self.encrypted and unlock:
            self.keyring = (keys or KeyChoice()).unlock(self.key_lock())
        locked = self.encrypted and self.keyring is None   # opened for its meta and key slots only
        self.codec = None if locked else BlockCodec(self.meta.get("block_id", "sha256"), self.zstd_level, self.keyring)
        self._maps = BlockMaps(self._dbs, self.codec.block_id, self.keyring) if version in PIECES_VERSIONS and \
            not locked else None   # None: whole maps of version 1 or 2, read as they are
        self._catalogs = Catalogs(self._dbs, self.codec.block_id, self.keyring) if "catalogs" in self._dbs and \
            not locked else None   # None: a store before format 7 opened read-only has no catalogs

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path, block_size: int = DEFAULT_BLOCK_SIZE, zstd_level: int = DEFAULT_ZSTD_LEVEL,
             key_slots: list[NewSlot] | None = None) -> "Store":
        """A new store, encrypted when given key slots to make (its master key is wrapped in each). One
        transaction: a store killed while it is made is made again by the same command."""
        cls.refuse_init(path, block_size, zstd_level, encrypted=bool(key_slots))
        try:
            make_private_folder(path, "store")
        except PermissionError:
            raise permission_denied(f"cannot create store {path}", path) from None
        _check_lmdb_files(path)
        store_id, master = os.urandom(16), new_master_key()
        slots = [new.make(str(n), master, store_id) for n, new in enumerate(key_slots or [], start=1)]
        meta_values = {"block_size": block_size, "zstd_level": zstd_level, "store_id": store_id.hex(),
                       "map_layout": MAP_LAYOUT, "blob_sizes": "all",
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "encryption": ENCRYPTION if slots else "none",
                       "block_id": "blake3-keyed" if slots else "blake3"}
        if slots:
            meta_values["key_check"] = Keyring(master, store_id).check(key_settings(meta_values)).hex()
            meta_values["last_slot_id"] = len(slots)
        env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE, max_dbs=len(DB_NAMES), subdir=True, mode=PRIVATE_FILE,
                        metasync=False)
        try:
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name, txn=txn, create=True) for name in DB_NAMES}
                if txn.get(b"format_version", db=dbs[b"meta"]) is not None:   # another init was quicker
                    raise RpfsError(f"{path} already holds a store")
                for name, value in meta_values.items():
                    txn.put(name.encode(), str(value).encode(), db=dbs[b"meta"])
                for slot in slots:
                    txn.put(slot.id.encode(), slot.to_json(), db=dbs[b"keys"])
                txn.put(b"format_version", str(FORMAT_VERSION).encode(), db=dbs[b"meta"])  # all else is there
            env.sync(True)   # the meta page too (metasync=False: write())
        except BaseException:
            env.close()
            raise
        return cls(path, env, readonly=False, keys=KeyChoice(master=master if slots else None))

    @staticmethod
    def refuse_init(path: Path, block_size: int, zstd_level: int, encrypted: bool) -> None:
        """Raise what init would refuse, before anything is made (a key file above all)."""
        check_trusted_place(path, "store", private=True)
        if block_size < 4096 or block_size > (64 << 20) or block_size & (block_size - 1):
            raise RpfsError("--block-size must be a power of two between 4 KiB and 64 MiB")
        if encrypted and block_size < MIN_ENCRYPTED_BLOCK_SIZE:
            raise RpfsError("an encrypted store needs --block-size 64K or more: each new block map piece takes a"
                            " random AES-GCM nonce of one key, safe for 2^32, and may hold one changed block: 256 TiB"
                            " at 64 KiB (or use --encryption none)")
        if not 1 <= zstd_level <= 19:
            raise RpfsError("--zstd-level must be between 1 and 19")
        try:
            if _holds_a_store(path):
                raise RpfsError(f"{path} already holds a store")
            if path.exists() and not path.is_dir():
                raise RpfsError(f"{path} exists and is not a directory")
        except PermissionError:
            raise permission_denied(f"cannot create store {path}", path) from None

    @classmethod
    def open(cls, path: Path | str | None, readonly: bool = False, keys: KeyChoice | None = None,
             unlock: bool = True) -> "Store":
        """Open a store; an encrypted one is unlocked with keys (unlock=False: only its meta and key slots
        can be read, for rpfs info)."""
        if not path:
            raise RpfsError("no store given: use --store DIR or set RPFS_STORE")
        path = Path(path)
        check_trusted_place(path, "store", private=True)   # readers too: root trusts no store another user could swap
        try:
            if not path.is_dir():
                raise RpfsError(f"store {path} does not exist (create it with: rpfs --store {path} init)")
            if not os.access(path, os.R_OK | os.X_OK):
                raise PermissionError
            _check_lmdb_files(path)
            if not (path / "data.mdb").exists():
                raise RpfsError(f"{path} is not an rpfs store (create one with: rpfs --store {path} init)")
            if not readonly:
                make_private(path)   # a store an older rpfs made readable by others
        except PermissionError:
            raise permission_denied(f"cannot open store {path}", path) from None
        try:
            env = lmdb.open(str(path), max_dbs=len(DB_NAMES), subdir=True, readonly=readonly,
                            create=False, map_size=INITIAL_MAP_SIZE, mode=PRIVATE_FILE, metasync=False)
            return cls(path, env, readonly, keys, unlock)
        except lmdb.Error as e:
            if "Permission denied" in str(e):
                raise permission_denied(f"cannot open store {path}", path / "data.mdb") from None
            raise RpfsError(f"cannot open store {path}: {e}") from None
        except KeyError:
            raise RpfsError(f"{path} is not an rpfs store (its metadata is missing)") from None

    def _open_dbs(self, names: tuple[bytes, ...]) -> dict:
        """Open named databases (each in a transaction of its own): while a backup grows the map, adopt
        its size and go on, as every transaction does (_txn), instead of failing to open the store."""
        while True:
            try:
                return {name.decode(): self._env.open_db(name, create=False) for name in names}
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)   # no transaction of ours is open yet

    def _need(self, name: str):
        """A database that only version 2 has; a version 1 store opened read-only lacks it."""
        db = self._dbs.get(name)
        if db is None:
            if name == "keys":
                raise RpfsError(f"store {self.path} has format version {self.format_version}, which is never"
                                " encrypted (rpfs info)")
            raise RpfsError(f"store {self.path} has format version 1; run a writing command on it once"
                            " (e.g. rpfs backup) to upgrade it")
        return db

    def close(self) -> None:
        self._env.close()
        if self._open_fd >= 0:
            os.close(self._open_fd)
            self._open_fd = -1

    def copy_compacted(self, target_folder: Path) -> None:
        """A compacted copy of the LMDB file, for compact (upkeep/compact.py) to swap in."""
        self._env.copy(str(target_folder), compact=True)

    def exclusive_open(self) -> bool:
        """Turn this handle's shared open lock exclusive: True when no other process has the store open."""
        try:
            fcntl.flock(self._open_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------------
    @contextmanager
    def _txn(self, write: bool) -> Iterator[lmdb.Transaction]:
        with self._resize_lock:
            self._txn_count += 1
        try:
            while True:
                try:
                    txn = self._env.begin(write=write, buffers=True)
                    break
                except lmdb.MapResizedError:
                    self._adopt_new_map_size()
            with txn:
                yield txn
        finally:
            with self._resize_lock:
                self._txn_count -= 1
                self._txn_idle.notify_all()

    def _adopt_new_map_size(self) -> None:
        """Another process grew the map: adopt its size once no transaction of ours is open."""
        with self._resize_lock:
            self._txn_count -= 1
            self._txn_idle.wait_for(lambda: self._txn_count == 0)
            self._env.set_mapsize(0)
            self._txn_count += 1

    def read(self):
        """A short read transaction; values are buffers valid only inside it."""
        return self._txn(write=False)

    def grow_map(self) -> None:
        """Double the map size; called by the writer after a MapFullError aborted its transaction."""
        with self._resize_lock:
            self._txn_idle.wait_for(lambda: self._txn_count == 0)
            self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def write(self, fill, durable: bool = True) -> None:
        """Run fill(txn) in one write transaction, growing the map and retrying when it is full.

        fill must be repeatable: on MapFullError the whole transaction is aborted and run again.
        A full disk aborts the transaction, so the store stays as it was. The environment is opened
        without LMDB's meta-page sync (MDB_NOMETASYNC: each commit flushes its data pages once, and a
        crash of the machine can at most undo the last commit, never damage the store); a durable
        write then flushes the meta page too before it returns. durable=False is for blobs nothing
        names yet: the transaction that names them is durable, and flushes theirs with its own.
        """
        while True:
            try:
                with self._txn(write=True) as txn:
                    fill(txn)
                if durable:
                    self._env.sync(True)
                return
            except lmdb.MapFullError:
                self.grow_map()
            except lmdb.Error as e:
                # LMDB reports a failed page write on a full disk as EIO, so ask the filesystem too.
                if _is_disk_full(e) or self._free_bytes() < LOW_SPACE:
                    raise RpfsError(f"the disk holding store {self.path} is full; the failed transaction"
                                    " was rolled back and the store is as it was before it") from None
                raise RpfsError(f"cannot write to store {self.path}: {e}; the failed transaction was"
                                " rolled back") from None

    def _free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def db(self, name: str):
        """A named database, for the store's own modules and for tests that damage a store on purpose."""
        return self._dbs[name]

    def table_names(self) -> list[str]:
        """The named databases this store has (its format's)."""
        return list(self._dbs)

    def map_size(self) -> int:
        return self._env.info()["map_size"]

    def stored_bytes(self) -> int:
        """Bytes of the LMDB file in use (pages in use times page size)."""
        info, stat = self._env.info(), self._env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    # -- blocks ------------------------------------------------------------------------------------
    def get_blob(self, digest: bytes, decode: Callable[[memoryview], T] = bytes,
                 part: tuple[int, int] | None = None) -> T | None:
        """A stored blob passed through decode while still in the map: decoding straight from LMDB's
        pages saves copying it out first (one decode is short enough to hold the transaction). part: the
        range of the block decode reads (IsolatedStore then sends only its frames; here all is mapped)."""
        with self.read() as txn:
            value = txn.get(digest, db=self._dbs["blocks"])
            return None if value is None else decode(value)

    def blob_lengths(self, digests: Iterable[bytes], per_transaction: int = 4096) -> int:
        """Total stored bytes of the given blocks, in short read transactions."""
        total, digests = 0, iter(digests)
        while chunk := list(itertools.islice(digests, per_transaction)):
            with self.read() as txn:
                total += sum(self._blob_sizes(txn, digest)[0] for digest in chunk)
        return total

    def _blob_sizes(self, txn, digest: bytes) -> tuple[int, int]:
        """(stored, raw) length of a stored blob, (0, 0) if there is none: from `sizes`, or for a blob an
        older format stored without a size record, from the blob itself (reading it all: py-lmdb)."""
        sizes = self._dbs.get("sizes")
        found = txn.get(digest, db=sizes) if sizes is not None else None
        if found is not None and len(found) == SIZES.size:   # else damaged: measure the blob
            return SIZES.unpack(found)
        blob = txn.get(digest, db=self._dbs["blocks"])
        if blob is None:
            return 0, 0
        try:
            return len(blob), read_header(blob).raw_length
        except CorruptBlockError:   # a damaged header: its stored bytes still count (and gc removes it)
            return len(blob), 0

    def put_blobs(self, blobs: dict[bytes, bytes], point: RecoveryPoint | None = None,
                  block_maps: dict[str, bytes] | None = None) -> None:
        """One write transaction: the blobs, and the recovery point that needs them if given (only that
        one is flushed whole: blobs no point names yet are worth no wait on the disk, write())."""
        blocks, sizes = self._dbs["blocks"], self._dbs["sizes"]

        def fill(txn):
            for digest, data in blobs.items():
                if txn.put(digest, data, db=blocks, overwrite=False):
                    txn.put(digest, SIZES.pack(len(data), read_header(data).raw_length), db=sizes)
            if point is not None:
                self.put_point(txn, point, block_maps or {})
        self.write(fill, durable=point is not None)

    # -- writer lock -------------------------------------------------------------------------------
    @contextmanager
    def writer_lock(self, what: str, wait_seconds: float = 0.0,
                    refuse: Callable[[str], str | None] | None = None) -> Iterator[None]:
        """One writer at a time. A backup fails at once with a clear message; maintenance (prune, gc)
        may wait for the running writer. refuse(holder) returns a message when waiting makes no sense."""
        lock_path = self.path / "writer.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)   # shared: not O_EXCL
        try:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    reason = refuse(holder) if refuse else None
                    if reason or time.monotonic() >= deadline:
                        raise RpfsError(reason or f"store {self.path} is busy: {holder} is writing to it") from None
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} (pid {os.getpid()})\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # -- catalog -----------------------------------------------------------------------------------
    @staticmethod
    def point_key(vm: str, point_id: str) -> bytes:
        return f"{vm}\0{point_id}".encode()

    @staticmethod
    def map_key(vm: str, point_id: str, disk: str) -> bytes:
        return f"{vm}\0{point_id}\0{disk}".encode()

    def put_point(self, txn, point: RecoveryPoint, block_maps: dict[str, bytes]) -> None:
        """Record a recovery point; called in the transaction that commits its last blocks."""
        for disk, block_map in block_maps.items():
            self._layout().put(txn, self.map_key(point.vm, point.id, disk), block_map)
        self._put_point_record(txn, point)
        txn.put(LAST_POINT_ID + point.vm.encode(), point.id.encode(), db=self._dbs["meta"])

    def last_point_ids(self, vm: str) -> set[str]:
        """The id of the VM's newest recovery point ever committed, even if pruned since (empty if none)."""
        with self.read() as txn:
            last = txn.get(LAST_POINT_ID + vm.encode(), db=self._dbs["meta"])
            return set() if last is None else {bytes(last).decode()}

    def delete_point(self, point: RecoveryPoint) -> int:
        """Remove a recovery point and release its blocks' references, in one transaction; returns how many
        blocks became unreferenced (rpfs gc removes them)."""
        released: list[int] = []

        def fill(txn):
            released[:] = [sum(self._layout().delete(txn, self.map_key(point.vm, point.id, disk.name))
                               for disk in point.disks)]
            if self._catalogs is not None:
                self._catalogs.delete(txn, self.point_key(point.vm, point.id))
            txn.delete(self.point_key(point.vm, point.id), db=self._dbs["points"])
        self.write(fill)
        return released[0]

    # -- catalogs of the files inside the disks (catalogs.py) -------------------------------------------
    def put_catalog(self, catalog: Catalog, listings: dict[bytes, bytes]) -> int | None:
        """Store a point's catalog (replacing the one it had) in one transaction; returns the bytes of
        listings new to the store, or None if the point is gone (pruned while it was cataloged)."""
        catalogs, key, added = self._catalog_layout(), self.point_key(catalog.vm, catalog.point_id), []

        def fill(txn):
            added.clear()
            if txn.get(key, db=self._dbs["points"]) is not None:
                added.append(catalogs.put(txn, key, catalog, listings))
        self.write(fill)
        return added[0] if added else None

    def catalog(self, vm: str, point_id: str) -> Catalog | None:
        if self._catalogs is None:
            return None
        with self.read() as txn:
            return self._catalogs.record(txn, self.point_key(vm, point_id))

    def listing(self, listing_id: bytes, where: str) -> list[Entry]:
        return decode_listing(self.listing_bytes(listing_id, where), f"a listing of {where}")

    def listing_bytes(self, listing_id: bytes, where: str) -> bytes:
        with self.read() as txn:
            return self._catalog_layout().listing(txn, listing_id, where)

    def listing_id(self, raw: bytes) -> bytes:
        return self._catalog_layout().listing_id(raw)

    def catalog_keys(self) -> list[tuple[str, str]]:
        """(vm, point id) of every catalog record."""
        if self._catalogs is None:
            return []
        with self.read() as txn:
            keys = self._catalogs.record_keys(txn)
        return [tuple(k.decode(errors="replace").split("\0", 1)) for k in keys]

    def delete_catalog(self, vm: str, point_id: str) -> None:
        self.write(lambda txn: self._catalog_layout().delete(txn, self.point_key(vm, point_id)))

    def catalog_stored_bytes(self) -> int:
        if self._catalogs is None:
            return 0
        with self.read() as txn:
            return self._catalogs.stored_bytes(txn)

    def listing_ref_counts(self) -> dict[bytes, int]:
        with self.read() as txn:
            return self._catalog_layout().ref_counts(txn)

    def stored_listing_ids(self) -> list[bytes]:
        with self.read() as txn:
            return self._catalog_layout().listing_ids(txn)

    def catalog_view(self) -> ContextManager[CatalogView]:
        """The catalogs as one read transaction sees them (check reads records, listings, counts and stored
        ids together: a catalog stored meanwhile, which takes no writer lock, never looks like damage).
        Raises RpfsError at once for a store without catalogs."""
        catalogs = self._catalog_layout()

        @contextmanager
        def view() -> Iterator[CatalogView]:
            with self.read() as txn:
                yield CatalogView(catalogs, txn, self.point_key)
        return view()

    def repair_listing_refs(self) -> RefRepair | None:
        """check --repair: recount listing_refs from the records and set them, removing the listings no
        record reaches, in one write transaction (a catalog stored beside it is never half counted, its new
        listings never taken for unreachable). None, and nothing changed, while a catalog is damaged."""
        catalogs, repaired = self._catalog_layout(), []

        def fill(txn):
            repaired[:] = [catalogs.repair_refs(txn)]
        self.write(fill)   # a damaged page of the catalog tables: RpfsError, the transaction rolled back
        return repaired[0]

    def _catalog_layout(self) -> Catalogs:
        if self._catalogs is None:
            self._keys()   # an encrypted store opened without its key says so
            raise RpfsError(f"store {self.path} has format version {self.format_version}, which has no catalogs;"
                            " run a writing command on it once (e.g. rpfs catalog) to upgrade it")
        return self._catalogs

    def table_damage(self, name: str) -> str | None:
        """What a walk of a table shows that lookups by key would not (check): keys out of order, or a key
        listed but not found. Bit rot in a branch page sends a lookup to the wrong leaf while a walk, which
        follows the pages' links, still lists every key: a point restore cannot find, a count gc cannot."""
        db = self._dbs.get(name)
        if db is None:
            return None
        previous = None
        try:
            with self.read() as txn:
                for key in txn.cursor(db=db).iternext(keys=True, values=False):
                    key = bytes(key)
                    if previous is not None and key <= previous:
                        return f"its keys are out of order after {_shown_key(previous)}"
                    if txn.get(key, db=db) is None:
                        return f"{_shown_key(key)} is listed but a lookup cannot find it"
                    previous = key
        except DatabaseError as e:
            return f"it cannot be read whole: {e}"
        return None

    def map_keys(self) -> list[bytes]:
        """Every block map's key, without its block map."""
        with self.read() as txn:
            return [bytes(k) for k in txn.cursor(db=self._dbs["maps"]).iternext(keys=True, values=False)]

    def ref_counts(self) -> tuple[dict[bytes, int], dict[bytes, int]]:
        """`refs` and `piece_refs` as they stand: how many pieces name each block, indexes each piece."""
        with self.read() as txn:
            return tuple({bytes(k): REF.unpack(v)[0] for k, v in txn.cursor(db=self._need(name))}
                         for name in ("refs", "piece_refs"))

    def recount(self) -> tuple[dict[bytes, int], dict[bytes, int], list[str]]:
        """What `refs` and `piece_refs` must hold, counted from the indexes and pieces (check), and the maps
        that could not be read whole (their blocks cannot be counted)."""
        piece_counts: dict[bytes, int] = {}
        named_by: dict[bytes, bytes] = {}   # piece id -> a map that names it
        damaged: list[str] = []
        for key in self.map_keys():
            try:
                with self.read() as txn:
                    ids = set(self._layout().piece_ids(txn, key))
            except CorruptBlockError as e:
                damaged.append(e.message)
                continue
            for piece_id in ids:
                piece_counts[piece_id] = piece_counts.get(piece_id, 0) + 1
                named_by.setdefault(piece_id, key)
        pieces = []
        for piece_id in piece_counts:
            try:
                with self.read() as txn:
                    pieces.append(self._layout().stored_piece(txn, piece_id, named_by[piece_id]))
            except CorruptBlockError as e:
                damaged.append(e.message)
        return count_references(pieces), piece_counts, damaged

    def replace_refs(self, counts: dict[bytes, int], piece_counts: dict[bytes, int]) -> None:
        """Rewrite `refs` and `piece_refs` whole, in one transaction (check --repair, from recount)."""
        def fill(txn):
            for name, values in (("refs", counts), ("piece_refs", piece_counts)):
                txn.drop(self._need(name), delete=False)
                for key, count in sorted(values.items()):
                    txn.put(key, REF.pack(count), db=self._need(name))
        self.write(fill)

    def unreferenced_blocks(self, per_transaction: int = 4096) -> Iterator[bytes]:
        """Digests of stored blocks no recovery point references (call with the writer lock held)."""
        refs = self._need("refs")
        yield from self._scan_blocks(per_transaction,
                                     lambda txn, chunk: [k for k in chunk if txn.get(k, db=refs) is None])

    def stored_blob_sizes(self, per_transaction: int = 4096) -> Iterator[tuple[bytes, int, int]]:
        """Every stored blob's id with its stored and raw length (usage), in short read transactions."""
        yield from self._scan_blocks(per_transaction,
                                     lambda txn, chunk: [(k, *self._blob_sizes(txn, k)) for k in chunk])

    def _scan_blocks(self, per_transaction: int, take: Callable[[lmdb.Transaction, list[bytes]], list[T]]) \
            -> Iterator[T]:
        """The stored blocks' ids in order, per_transaction at a time, each batch passed to take(txn, ids) in
        its own short read transaction."""
        after = b""
        while True:
            with self.read() as txn:
                cursor = txn.cursor(db=self._dbs["blocks"])
                if not cursor.set_range(after):
                    return
                chunk = []
                for key in cursor.iternext(keys=True, values=False):
                    key = bytes(key)
                    if key == after:
                        continue
                    chunk.append(key)
                    if len(chunk) >= per_transaction:
                        break
                taken = take(txn, chunk)
            yield from taken
            if len(chunk) < per_transaction:
                return
            after = chunk[-1]

    # -- records: policies, protected VMs, jobs (JSON by name) ------------------------------------
    def put_record(self, kind: str, name: str, record: dict) -> None:
        db, key = self._need(kind), name.encode()
        value = self._seal(kind, key, json.dumps(record, sort_keys=True).encode())
        self.write(lambda txn: txn.put(key, value, db=db))

    def get_record(self, kind: str, name: str) -> dict | None:
        db = self._need(kind)
        with self.read() as txn:
            value = txn.get(name.encode(), db=db)
            return None if value is None else _record(kind, name, self._unseal(kind, name.encode(), value))

    def records(self, kind: str) -> dict[str, dict]:
        db = self._dbs.get(kind)
        if db is None:
            return {}
        with self.read() as txn:
            return {bytes(k).decode(errors="replace"): _record(kind, bytes(k), self._unseal(kind, bytes(k), v))
                    for k, v in txn.cursor(db=db)}

    def delete_record(self, kind: str, name: str) -> bool:
        return self.delete_records(kind, [name]) == 1

    def delete_records(self, kind: str, names: Iterable[str]) -> int:
        """Delete records in one transaction; returns how many there were."""
        db, names = self._need(kind), list(names)
        deleted: list[bool] = []

        def fill(txn):
            deleted[:] = [txn.delete(name.encode(), db=db) for name in names]
        self.write(fill)
        return sum(deleted)

    def modify_point(self, vm: str, point_id: str, change: Callable[[RecoveryPoint], None]) -> RecoveryPoint:
        """Change a recovery point's record (pin, snapshot bookkeeping) in one transaction that re-reads
        it, so two changes never undo each other; block maps never change."""
        changed = []

        def fill(txn):
            value = txn.get(self.point_key(vm, point_id), db=self._dbs["points"])
            if value is None:
                raise RpfsError(f"recovery point {vm}/{point_id} no longer exists")
            point = self._point_record(self.point_key(vm, point_id), value)
            change(point)
            self._put_point_record(txn, point)
            changed[:] = [point]
        self.write(fill)
        return changed[0]

    def points(self, vm: str | None = None) -> list[RecoveryPoint]:
        """All recovery points (of one VM), oldest first."""
        prefix = f"{vm}\0".encode() if vm is not None else b""
        found = []
        with self.read() as txn:
            cursor = txn.cursor(db=self._dbs["points"])
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    found.append(self._point_record(bytes(key), value))
        return found

    def has_point(self, vm: str, point_id: str) -> bool:
        with self.read() as txn:
            return txn.get(self.point_key(vm, point_id), db=self._dbs["points"]) is not None

    def point_ids(self, vm: str) -> list[str]:
        """The VM's recovery point ids, oldest first, without reading their records."""
        prefix = f"{vm}\0".encode()
        with self.read() as txn:
            cursor = txn.cursor(db=self._dbs["points"])
            if not cursor.set_range(prefix):
                return []
            ids = []
            for key in cursor.iternext(keys=True, values=False):
                if not bytes(key).startswith(prefix):
                    break
                ids.append(bytes(key)[len(prefix):].decode())
            return ids

    def latest_point_id(self, vm: str) -> str | None:
        """The VM's newest recovery point id (its last key): one B-tree step, whatever the count."""
        prefix = f"{vm}\0".encode()
        with self.read() as txn:
            cursor = txn.cursor(db=self._dbs["points"])
            # The first key past the VM's ("\x01" follows the "\0" of all of them), then one step back.
            found = cursor.prev() if cursor.set_range(f"{vm}\x01".encode()) else cursor.last()
            key = bytes(cursor.key()) if found else b""
            return key[len(prefix):].decode() if key.startswith(prefix) else None

    def vms(self) -> list[str]:
        """Every VM with a recovery point: one B-tree step per VM, no record read."""
        found: list[str] = []
        with self.read() as txn:
            cursor = txn.cursor(db=self._dbs["points"])
            more = cursor.first()
            while more:
                vm = bytes(cursor.key()).split(b"\0", 1)[0]
                found.append(vm.decode())
                more = cursor.set_range(vm + b"\x01")
        return found

    def point(self, vm: str, point_id: str | None = None) -> RecoveryPoint:
        """One recovery point by id, or the VM's latest when point_id is None or 'latest'."""
        wanted = self.latest_point_id(vm) if point_id in (None, "latest") else point_id
        if wanted is not None:
            with self.read() as txn:
                value = txn.get(self.point_key(vm, wanted), db=self._dbs["points"])
                if value is not None:
                    return self._point_record(self.point_key(vm, wanted), value)
        latest = self.latest_point_id(vm)
        if latest is None:
            known = ", ".join(self.vms()) or "none"
            raise RpfsError(f"unknown VM {vm!r} in store {self.path} (VMs: {known})")
        raise RpfsError(f"VM {vm!r} has no recovery point {point_id!r} (latest: {latest})")

    def block_map(self, map_key: bytes) -> bytes:
        """A whole block map (32 bytes per block), checked; for scans that visit every block anyway."""
        with self.read() as txn:
            if self._maps is not None:
                return self._layout().whole(txn, map_key)
            block_map = txn.get(map_key, db=self._dbs["maps"])
            return b"" if block_map is None else bytes(block_map)

    def map_piece(self, map_key: bytes, piece: int) -> bytes:
        """Entries piece*MAP_PIECE... of a block map (fewer at its end), checked."""
        with self.read() as txn:
            if self._maps is not None:
                return self._layout().piece(txn, map_key, piece)
            block_map = txn.get(map_key, db=self._dbs["maps"])
            if block_map is None:
                raise RpfsError("block map missing for " + map_key.decode().replace("\0", "/"))
            return flat_map_piece(block_map, map_key, piece)

    def map_index(self, map_key: bytes) -> tuple[int, list[bytes]]:
        """A block map's entry count and piece ids, checked (a vault push sends pieces as they are)."""
        with self.read() as txn:
            return self._layout().index(txn, map_key)

    def stored_piece(self, piece_id: bytes) -> tuple[bytes, bytes]:
        """A piece as stored (sealed when encrypted) and its checked entries."""
        with self.read() as txn:
            stored = txn.get(piece_id, db=self._dbs["pieces"])
            return (b"", b"") if stored is None else (bytes(stored), self._layout().stored_piece(txn, piece_id, None))

    def block_digest(self, map_key: bytes, index: int) -> bytes:
        """The id of one block of a disk, from its piece of the block map (pieces are kept: a reader going
        block by block fetches and checks each piece once)."""
        return self._pieces.digest(map_key, index, self.map_piece)

    # -- the read side (source.py): reads in reader processes; points kept by leases (KeptByLeases) ---
    @contextmanager
    def isolated(self) -> Iterator["RecoverySource"]:
        from rpfs.store.isolated import IsolatedStore   # isolated.py is built on this module
        with IsolatedStore.open(self.path, self.master_key) as reader:
            yield reader

    def _layout(self) -> BlockMaps:
        if self._maps is None:
            self._keys()   # an encrypted store opened without its key says so
            raise RpfsError(f"store {self.path} has format version {self.format_version}; run a writing command on"
                            " it once (e.g. rpfs backup) to upgrade it")
        return self._maps

    # -- what encryption adds: sealed records, key slots -----------------------------------------
    @property
    def master_key(self) -> bytes | None:
        """The unlocked master key, to hand to a process of rpfs's own (a daemon, a reader process)."""
        return None if self.keyring is None else self.keyring.master

    def _keys(self) -> Keyring:
        if self.keyring is None:
            raise RpfsError(f"store {self.path} is encrypted and was opened without its key")
        return self.keyring

    def _seal(self, db: str, key: bytes, value: bytes) -> bytes:
        return self._keys().seal_record(value, db.encode() + b"\0" + key) if self.encrypted else value

    def _unseal(self, db: str, key: bytes, value):
        return self._keys().unseal_record(value, db.encode() + b"\0" + key) if self.encrypted else value

    def _point_record(self, key: bytes, value) -> RecoveryPoint:
        return RecoveryPoint.from_json(self._unseal("points", key, value))

    def _put_point_record(self, txn, point: RecoveryPoint) -> None:
        key = self.point_key(point.vm, point.id)
        txn.put(key, self._seal("points", key, point.to_json()), db=self._dbs["points"])

    def key_lock(self) -> KeyLock:
        """The key slots (a damaged one is listed apart: the others still open the store)."""
        slots, damaged = [], []
        with self.read() as txn:
            for key, value in txn.cursor(db=self._need("keys")):
                try:
                    slots.append(KeySlot.from_json(value))
                except CorruptBlockError:
                    damaged.append(bytes(key).decode(errors="replace"))
        try:
            check_value = bytes.fromhex(self.meta.get("key_check", ""))
        except ValueError:
            check_value = b""
        return KeyLock(self.path, self.store_id, key_settings(self.meta), check_value, slots, damaged)

    def add_key_slot(self, new: NewSlot, replacing: KeySlot | None = None) -> tuple[KeySlot, bool]:
        """Wrap the master key in a new slot, or in place of `replacing` if that slot is still as it was read
        (a slot changed meanwhile is never overwritten). Returns the slot and True, or the slot the same key
        file or recovery key opens already and False. Slot ids are never given twice (meta last_slot_id)."""
        keyring, keys, meta = self._keys(), self._need("keys"), self._dbs["meta"]
        fingerprint = new.fingerprint(self.store_id)
        while True:
            with self.read() as txn:
                last = int(bytes(txn.get(b"last_slot_id", db=meta) or b"0"))
            slot_id = replacing.id if replacing is not None else str(last + 1)
            slot = new.make(slot_id, keyring.master, self.store_id)   # scrypt runs here, not in the transaction
            outcome: list = []

            def fill(txn):
                slots = [KeySlot.from_json(v) for _k, v in txn.cursor(db=keys)]
                same = [s for s in slots if fingerprint and (s.kind, s.fingerprint) == (new.kind, fingerprint)]
                if replacing is not None:
                    current = txn.get(replacing.id.encode(), db=keys)
                    if current is None or bytes(current) != replacing.to_json():
                        raise RpfsError(f"key slot {replacing.id} changed or went meanwhile; nothing was changed"
                                        " (rpfs key list, then run it again)")
                elif same:
                    outcome[:] = [same[0], False]
                    return
                elif int(bytes(txn.get(b"last_slot_id", db=meta) or b"0")) != last:
                    outcome[:] = [None, False]   # another key change took that id: make the slot again
                    return
                else:
                    txn.put(b"last_slot_id", slot_id.encode(), db=meta)
                txn.put(slot_id.encode(), slot.to_json(), db=keys)
                outcome[:] = [slot, True]
            self.write(fill)
            if outcome[0] is not None:
                return outcome[0], outcome[1]

    def remove_key_slot(self, slot_id: str) -> KeySlot:
        """Remove a slot; the last one is refused (without it nobody could ever read the store again)."""
        keys, removed = self._need("keys"), []

        def fill(txn):
            slots = [KeySlot.from_json(v) for _k, v in txn.cursor(db=keys)]
            found = [s for s in slots if s.id == slot_id]
            if not found:
                raise RpfsError(f"store {self.path} has no key slot {slot_id!r} (rpfs key list)")
            if len(slots) == 1:
                raise RpfsError(f"slot {slot_id} is the last key slot of store {self.path}: without it nobody"
                                " could read the store again (add another first: rpfs key add)")
            txn.delete(slot_id.encode(), db=keys)
            removed[:] = found
        self.write(fill)
        return removed[0]

    def has_block(self, digest: bytes) -> bool:
        """In a store made at format 5, from `sizes` (written and deleted with each blob): its small records
        sit on few pages, while a lookup in `blocks` touches the blob's first page, a disk read of its own
        when the store is cold (checksum incremental after 5% of 2 GiB, cold: 4.6 -> 2.7 s). A store
        upgraded from format 3 or 4 asks `blocks`: it may hold blobs without a size record, and an older
        rpfs that had it open before the upgrade may delete a blob and leave its record."""
        with self.read() as txn:
            if self._all_sizes:
                return txn.get(digest, db=self._dbs["sizes"]) is not None
            return txn.cursor(db=self._dbs["blocks"]).set_key(digest)

    def remove_blobs(self, digests: list[bytes]) -> list[int]:
        """Delete blobs and their size records in one transaction (gc); the stored length of each that was there."""
        removed: list[int] = []

        def fill(txn):
            removed.clear()   # filled anew if a full map makes write run fill again
            for digest in digests:
                stored = self._blob_sizes(txn, digest)[0]
                txn.delete(digest, db=self._dbs["sizes"])
                if txn.delete(digest, db=self._dbs["blocks"]):
                    removed.append(stored)
        self.write(fill)
        return removed


def key_settings(meta: dict) -> bytes:
    """What the key check binds: the settings that say how to read (and write) the store."""
    return "\0".join(str(meta.get(name, "")) for name in ("encryption", "block_id", "block_size")).encode()


class MapPieces:
    """Checked block map pieces of an encrypted store, kept (recovery points never change): a reader going
    block by block checks each piece of MAP_PIECE entries once, not once per block."""

    def __init__(self, kept: int = 64):
        self._kept, self._pieces, self._lock = kept, OrderedDict(), threading.Lock()

    def digest(self, map_key: bytes, index: int, fetch: Callable[[bytes, int], bytes]) -> bytes:
        piece_number, at = divmod(index, MAP_PIECE)
        with self._lock:
            piece = self._pieces.get((map_key, piece_number))
            if piece is not None:
                self._pieces.move_to_end((map_key, piece_number))
        if piece is None:
            piece = fetch(map_key, piece_number)
            with self._lock:
                self._pieces[(map_key, piece_number)] = piece
                while len(self._pieces) > self._kept:
                    self._pieces.popitem(last=False)
        if (at + 1) * DIGEST_SIZE > len(piece):
            raise RpfsError(f"block {index} is beyond the block map of " + map_key.decode().replace("\0", "/"))
        return piece[at * DIGEST_SIZE:(at + 1) * DIGEST_SIZE]


def _holds_a_store(path: Path) -> bool:
    """True if path holds a store whose creation finished (an init killed half-way left none)."""
    try:
        if (path / "data.mdb").stat().st_size < 2 * 4096:   # not even LMDB's two meta pages yet
            return False
    except OSError:
        return False
    try:
        env = lmdb.open(str(path), max_dbs=len(DB_NAMES), subdir=True, readonly=True, create=False, lock=False)
    except lmdb.Error:   # something is there that is not ours to replace
        raise RpfsError(f"{path}/data.mdb is not a readable store file: if an init that was killed left it, remove"
                        f" {path} and run init again; if it held backups, rpfs cannot read them") from None
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            return txn.get(b"format_version", db=meta) is not None
    except lmdb.Error:
        return False   # no meta database yet: the first transaction never committed
    finally:
        env.close()


def _hold_open_lock(path: Path) -> int:
    """Every open handle holds STORE/open.lock shared, so compact can know it is alone (exclusive)."""
    try:
        fd = os.open(path / "open.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1   # read-only media: nobody can compact it either
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RpfsError(f"store {path} is being compacted; try again in a moment") from None
    return fd


def _shown_key(key: bytes) -> str:
    """A key as a user reads it: names with their parts joined by '/', digests in hex."""
    text = key.replace(b"\0", b"/").decode(errors="replace")
    return text if text.isprintable() else key.hex()[:16]


def _record(kind: str, name, value) -> dict:
    """A JSON record as stored; a damaged one (bit rot) is an error naming it, never a traceback."""
    try:
        record = parse_json(bytes(value))
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise CorruptBlockError(f"the {kind} record {name!r} is damaged; rpfs check tells more")
    return record
