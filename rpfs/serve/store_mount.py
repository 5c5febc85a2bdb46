"""The store mount: the read-only recovery-point tree of a store, served by a daemon (`rpfs mount`).

The daemon reads the store through reader processes (store/isolated.py: a damaged LMDB page crashes a
reader, not the mount) and holds a lease (store/leases.py) listing the recovery points
with an image open, so prune never deletes one under a reader.

Only root reads the mount, unless a group is allowed: then the mount has allow_other, and the kernel lets
that group's members read (default_permissions; modes in store_tree.py) and refuses everyone else.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from rpfs.host.access import group_id
from rpfs.serve.daemon import Filesystem, check_mountpoint, start_daemon
from rpfs.serve.image import BlockCache
from rpfs.serve.store_tree import RecoveryPointFS
from rpfs.store.isolated import IsolatedStore
from rpfs.store.leases import Lease
from rpfs.store.key_slots import KeyChoice
from rpfs.store.store import Store
from rpfs.vault.config import VaultConfig


def store_filesystem(store_path: Path, cache_bytes: int, allow_group: str | None = None,
                     master_key: bytes | None = None) -> Filesystem:
    """The read-only recovery-point tree of a store; allow_group: a group whose members may read it too."""
    group = group_id(allow_group) if allow_group else None
    store = IsolatedStore.open(store_path, master_key)
    try:
        lease = Lease(store.path)
    except OSError as e:   # a store on read-only media: nothing can prune it either
        logging.getLogger("rpfs.mount").warning("no lease in %s: %s", store.path, e)
        lease = None

    def close() -> None:
        store.close()
        if lease is not None:
            lease.close()
    ops = RecoveryPointFS(store, BlockCache(cache_bytes), lease=lease, group=group)
    options = {"ro"} | ({"allow_other", "default_permissions"} if group is not None else set())
    return Filesystem(ops, options, close, start_tasks=ops.start_read_ahead)


def vault_filesystem(config: VaultConfig, cache_bytes: int, allow_group: str | None, master_key: bytes) -> Filesystem:
    """The same tree over a vault: blocks fetched by ranged GETs into the block cache (bounded, in memory),
    read ahead as locally. No lease: nothing local prunes a vault."""
    from rpfs.vault.vault import Vault   # boto3: imported only by a vault's mount
    group = group_id(allow_group) if allow_group else None
    vault = Vault.open(config, KeyChoice(master=master_key))
    ops = RecoveryPointFS(vault, BlockCache(cache_bytes), read_threads=vault.parallel_reads, group=group)
    options = {"ro"} | ({"allow_other", "default_permissions"} if group is not None else set())
    return Filesystem(ops, options, vault.close, start_tasks=ops.start_read_ahead)


def start_store_daemon(store, mountpoint: Path, cache_bytes: int, allow_group: str | None = None) -> int:
    """Start `rpfs mount --foreground` in the background for an open (so unlocked) store or vault (rpfs.vault);
    return its pid once mounted."""
    if allow_group:
        group_id(allow_group)   # an unknown group: said here, in one line
    mountpoint = check_mountpoint(mountpoint)
    source = ["--store", os.path.abspath(store.path)] if isinstance(store, Store) else ["--vault", store.config.name]
    argv = [*source, "mount", str(mountpoint), "--foreground", "--cache-mb", str(cache_bytes >> 20)]
    if allow_group:
        argv += ["--allow-group", allow_group]
    return start_daemon(argv, mountpoint, store.block_size, store.master_key)
