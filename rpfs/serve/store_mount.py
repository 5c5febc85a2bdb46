"""The store mount: the read-only recovery-point tree of a store, served by a daemon (`rpfs mount`).

The daemon reads the store through reader processes (store/isolated.py: a damaged LMDB page crashes a
reader, not the mount), or a vault, and keeps the recovery points with an image open (store/source.py:
a lease in a store, store/leases.py), so prune never deletes one under a reader.

Only root reads the mount, unless a group is allowed: then the mount has allow_other, and the kernel lets
that group's members read (default_permissions; modes in store_tree.py) and refuses everyone else.
"""
from __future__ import annotations

import logging
from pathlib import Path

from rpfs.host.access import group_id
from rpfs.serve.daemon import Filesystem, check_mountpoint, start_daemon
from rpfs.serve.image import BlockCache
from rpfs.serve.store_tree import RecoveryPointFS
from rpfs.store.isolated import IsolatedStore
from rpfs.store.key_slots import KeyChoice
from rpfs.store.source import RecoverySource, SourceName


def open_for_daemon(name: SourceName, master_key: bytes | None) -> RecoverySource:
    """The source a daemon of rpfs's own reads (the mount, an instant restore), handed its master key: a
    store through reader processes (a damaged LMDB page crashes a reader, not the daemon), or a vault."""
    if name.vault:
        from rpfs.vault.named import open_vault   # boto3: imported only by a vault's daemon
        return open_vault(name.vault, KeyChoice(master=master_key))
    return IsolatedStore.open(name.store, master_key)


def store_filesystem(name: SourceName, cache_bytes: int, allow_group: str | None = None,
                     master_key: bytes | None = None) -> Filesystem:
    """The read-only recovery-point tree of a store or a vault; allow_group: a group whose members may read
    it too. A vault's blocks are fetched by ranged GETs into the block cache (bounded, in memory), read ahead
    as locally, and need no lease: nothing local prunes a vault (its keeper keeps nothing)."""
    group = group_id(allow_group) if allow_group else None
    source = open_for_daemon(name, master_key)
    try:
        keeper = source.keeper()
    except OSError as e:   # a store on read-only media: nothing can prune it either
        logging.getLogger("rpfs.mount").warning("no lease in %s: %s", source.path, e)
        keeper = None

    def close() -> None:
        source.close()
        if keeper is not None:
            keeper.close()
    ops = RecoveryPointFS(source, BlockCache(cache_bytes), read_threads=source.parallel_reads or 4, keeper=keeper,
                          group=group)
    options = {"ro"} | ({"allow_other", "default_permissions"} if group is not None else set())
    return Filesystem(ops, options, close, start_tasks=ops.start_read_ahead)


def start_store_daemon(source: RecoverySource, mountpoint: Path, cache_bytes: int,
                       allow_group: str | None = None) -> int:
    """Start `rpfs mount --foreground` in the background for an open (so unlocked) store or vault;
    return its pid once mounted."""
    if allow_group:
        group_id(allow_group)   # an unknown group: said here, in one line
    mountpoint = check_mountpoint(mountpoint)
    argv = [*source.source_name().options(), "mount", str(mountpoint), "--foreground", "--cache-mb",
            str(cache_bytes >> 20)]
    if allow_group:
        argv += ["--allow-group", allow_group]
    return start_daemon(argv, mountpoint, source.block_size, source.master_key)
