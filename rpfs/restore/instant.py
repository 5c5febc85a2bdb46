"""Instant restore: start (or resume) a writable image served by a daemon that copies it out meanwhile.

The daemon mounts a one-file FUSE filesystem in the run dir (run_dir.instant_files) whose <disk>.img is the
writable image (writable_image.WritableImage); a background thread copies the missing blocks into the target.
A registry file beside the mountpoint lets `rpfs jobs` list instant restores, and their progress is
read from the target's state file, so it shows even when no daemon runs.
The source is a store (a hold file in its leases keeps the point from prune) or a vault (a hold object
in the vault keeps the point from prune and its blocks from gc: vault/vault.py).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place
from rpfs.host.mountinfo import fstype_at
from rpfs.restore.partial import abandon, in_use, settle, state_path
from rpfs.restore.writable_image import (
    InstantSource,
    WritableImage,
    create,
    progress_of,
    read_source,
    unfinished_source,
)
from rpfs.host import run_dir
from rpfs.serve import daemon
from rpfs.serve.image import BlockCache
from rpfs.serve.writable_tree import WritableImageFS
from rpfs.serve.store_mount import open_for_daemon
from rpfs.store.leases import LEASE_DIR, release_hold
from rpfs.store.recovery_point import RecoveryPoint
from rpfs.store.source import RecoverySource, SourceName

CACHE_BYTES = 64 << 20
REGISTERED = ("target", "image", "mountpoint", "vm", "point_id", "disk", "blocks", "store", "vault")


@dataclass
class InstantJob:
    target: str
    image: str
    mountpoint: str
    vm: str
    point_id: str
    disk: str
    store: str = ""
    vault: str = ""            # the vault's name when the copy comes from a vault (store is "" then)
    state: str = ""            # copying | stopped | complete | discarded
    copied_blocks: int = 0
    blocks: int = 0
    pid: int | None = None


def instant_filesystem(target: Path, copy_bytes_per_second: float = 0,
                       master_key: bytes | None = None) -> daemon.Filesystem:
    """What the daemon serves: the writable image, with the copy running beside it."""
    source = read_source(target)
    hold_name = run_dir.instant_files(target)[0].stem
    store, release, close_source = _open_source(source, hold_name, master_key)
    try:   # once whole, prune may have the point: on_complete releases the hold
        image = WritableImage(target, store, BlockCache(CACHE_BYTES), on_complete=release)
    except BaseException:
        close_source()
        raise

    def close() -> None:
        image.close()
        close_source()
    return daemon.Filesystem(WritableImageFS(image, f"{source.disk}.img"), set(), close,
                             lambda stop: image.hydrate(stop, copy_bytes_per_second))


def _open_source(source: InstantSource, hold_name: str, master_key: bytes | None
                 ) -> tuple[RecoverySource, Callable[[], None], Callable[[], None]]:
    """(the store or vault to read, what releases the hold, what closes it) for the daemon."""
    store = open_for_daemon(SourceName(store=Path(source.store), vault=source.vault), master_key)
    try:
        store.adopt_hold(hold_name)   # a vault's point as held: prune may have deleted its manifest meanwhile
        keeper = store.keeper()   # prune must not delete the recovery point while it is copied
        try:
            keeper.take(source.vm, source.point_id)
        except BaseException:
            keeper.close()
            raise
    except BaseException:
        store.close()
        raise

    def close() -> None:
        keeper.close()
        store.close()
    return store, lambda: store.release_hold(hold_name), close


def _vault_holds(vault: str, name: str) -> bool:
    from rpfs.vault.vault import has_hold
    return has_hold(vault, name)


def _release_hold(store_path: str, vault: str, name: str) -> None:
    if vault:
        from rpfs.vault.vault import release_hold as release_vault_hold
        release_vault_hold(vault, name)
    elif store_path:
        release_hold(Path(store_path), name)


def start(store: RecoverySource, point: RecoveryPoint, disk_name: str, target: Path,
          copy_mbps: float = 0) -> InstantJob:
    """Create the target (or resume an unfinished one) and start its daemon; returns once it serves.
    store: a Store, or a Vault (rpfs.vault) to restore from the vault."""
    target = Path(os.path.abspath(target))
    check_trusted_place(target, "instant restore target")
    disk = point.disk(disk_name)
    name = store.source_name()
    source = InstantSource(store=str(name.store.resolve()) if name.store else "", vm=point.vm, point_id=point.id,
                           disk=disk.name, size=disk.size, block_size=disk.block_size, vault=name.vault)
    registry, mountpoint = run_dir.instant_files(target)
    settle(target)
    existing = unfinished_source(target)   # read once: the copy may complete (and the state file go) meanwhile
    if existing is None:
        earlier = _registered(registry)
        if earlier is not None and target.exists() and \
                (earlier.vm, earlier.point_id, earlier.disk) == (point.vm, point.id, disk.name):
            return _with_progress(earlier)   # the same command again, after the copy finished: it is done
        # prune keeps the point until the copy is done
        new_hold = store.hold(registry.stem, point.vm, point.id, target)
        try:
            create(target, source)
        except BaseException:
            if new_hold:
                _release_hold(source.store, source.vault, registry.stem)
            raise
    elif (existing.vm, existing.point_id, existing.disk) != (source.vm, source.point_id, source.disk):
        raise RpfsError(f"{target} is an unfinished instant restore of {existing.vm}/{existing.point_id}/"
                        f"{existing.disk}; resume it with those, or choose another path")
    # Resuming keeps the hold its first run took; none is taken anew: a missing hold means the copy
    # has just completed (the hold goes first), and a new one would then outlive it.
    job = InstantJob(target=str(target), image=str(mountpoint / f"{disk.name}.img"), mountpoint=str(mountpoint),
                     vm=point.vm, point_id=point.id, disk=disk.name, blocks=source.blocks, store=source.store,
                     vault=source.vault)
    if daemon.daemon_pid(Path(job.mountpoint)) is not None:
        return _with_progress(job)   # already served (the same command run again): nothing more to start
    if fstype_at(str(mountpoint)) is not None:
        daemon.unmount(mountpoint)   # left behind by a daemon that died
    run_dir.make_folder(mountpoint)
    run_dir.write_file(registry, json.dumps({k: getattr(job, k) for k in REGISTERED}))
    try:
        job.pid = daemon.start_daemon(["instant-daemon", str(target), str(mountpoint), "--copy-mbps",
                                       str(copy_mbps)], mountpoint, disk.block_size, store.master_key)
    except RpfsError:
        served = _served_by_another(job)
        if served is None:
            raise
        return served
    return _with_progress(job)


def _served_by_another(job: InstantJob, wait_seconds: float = 10.0) -> InstantJob | None:
    """The job, if the daemon of an earlier run (its starter killed) was starting too and serves it: that
    one won the partial file's flock, so ours failed; or it completed the copy meanwhile. None if not."""
    target, deadline = Path(job.target), time.monotonic() + wait_seconds
    while True:
        complete = target.exists() and unfinished_source(target) is None
        if complete or daemon.daemon_pid(Path(job.mountpoint)) is not None:
            return _with_progress(job)
        if not in_use(target) or time.monotonic() > deadline:
            return None
        time.sleep(0.1)   # it has the partial file but has not written its pid file yet


def jobs() -> list[InstantJob]:
    return [_with_progress(job) for job in map(_registered, run_dir.instant_records()) if job is not None]


def _registered(registry: Path) -> InstantJob | None:
    """The instant restore a run-dir record describes, or None (no record, or a damaged one)."""
    try:
        return InstantJob(**{k: v for k, v in json.loads(registry.read_text()).items() if k in REGISTERED})
    except (OSError, ValueError, TypeError):
        return None


def _with_progress(job: InstantJob) -> InstantJob:
    job.pid = daemon.daemon_pid(Path(job.mountpoint))
    target = Path(job.target)
    if job.pid is None:
        settle(target)
    try:
        job.copied_blocks, job.blocks = progress_of(target)
        job.state = "copying" if job.pid is not None else "stopped"
    except RpfsError:
        if state_path(target).exists():
            raise   # a damaged state file: say so
        # no state file (any more): the copy is complete, or was thrown away by a discard that was killed
        job.state = "complete" if target.exists() else "discarded"
        job.copied_blocks = job.blocks if target.exists() else 0
    return job


def find(target: Path) -> InstantJob:
    target = Path(os.path.abspath(target))
    for job in jobs():
        if job.target == str(target):
            return job
    raise RpfsError(f"no instant restore into {target} (see rpfs jobs)")


def wait(target: Path, poll_seconds: float = 0.2, progress=None) -> InstantJob:
    """Wait until the copy into target is complete; fail if its daemon stops first."""
    while True:
        job = _with_progress(find(target))
        if progress and job.blocks > 0:
            progress(job.copied_blocks, job.blocks)
        if job.state == "complete":
            return job
        if job.state == "stopped":
            raise RpfsError(f"the instant restore into {target} stopped at {job.copied_blocks}/{job.blocks} blocks;"
                            f" resume it: rpfs instant-restore {job.vm} {job.point_id} --disk {job.disk} --to {target}")
        if job.state == "discarded":
            raise RpfsError(f"the instant restore into {target} was discarded; rpfs instant-stop {target} --discard"
                            " removes what is left of it")
        time.sleep(poll_seconds)


def stop(target: Path) -> InstantJob:
    """Unmount the writable image; an unfinished copy stays resumable, a finished (or discarded) one is forgotten."""
    job = find(target)
    if fstype_at(job.mountpoint) is not None:
        daemon.unmount(Path(job.mountpoint))
    daemon.forget_ended(Path(job.mountpoint))   # a stop killed after its unmount left the pid file
    job = _with_progress(job)
    if job.state in ("complete", "discarded"):
        registry, mountpoint = run_dir.instant_files(Path(job.target))
        _release_hold(job.store, job.vault, registry.stem)
        registry.unlink(missing_ok=True)
        try:
            mountpoint.rmdir()
        except OSError:
            pass
    return job


@dataclass
class Discarded:
    """What `instant-stop --discard` found and removed."""
    target: str
    was: str                   # unfinished (its copy is thrown away) | complete (target is kept)
    removed: list[str]
    vm: str = ""
    point_id: str = ""
    disk: str = ""


def discard(target: Path, store_path: Path | None = None, wait_seconds: float = 10.0,
            vault_name: str = "") -> Discarded:
    """Abandon an instant restore: stop serving it, then remove its copy (unless complete), its hold and
    its record, in that order, so that a kill at any moment leaves what running it again finishes.

    Found from the target alone: the record and the hold are named after its path, the store or vault
    comes from the state file, the record, or store_path / vault_name (the record is gone after a reboot,
    /run being a tmpfs; a start killed between taking its hold and writing its state left only the hold)."""
    target = Path(os.path.abspath(target))
    registry, mountpoint = run_dir.instant_files(target)
    job = _registered(registry)
    source = None
    try:
        source = unfinished_source(target)
    except RpfsError:
        pass   # a damaged state file: the restore cannot resume, so it can still be discarded
    stores = [s for s in (source.store if source else "", job.store if job else "", store_path or "") if s]
    held = [Path(s) / LEASE_DIR / f"hold-{registry.stem}" for s in dict.fromkeys(map(os.path.abspath, stores))]
    vault = source.vault if source else job.vault if job else vault_name
    if job is None and not state_path(target).exists() and not any(h.exists() for h in held) \
            and not (vault and _vault_holds(vault, registry.stem)):
        raise RpfsError(f"no instant restore into {target} (see rpfs jobs)")
    if fstype_at(str(mountpoint)) is not None:
        daemon.unmount(mountpoint)    # refused while the image is in use (a loop device, a VM)
    _wait_until_gone(mountpoint, wait_seconds)
    settle(target)
    was = "complete" if target.exists() and not state_path(target).exists() else "unfinished"
    removed = [str(p) for p in abandon(target)] if was == "unfinished" else []
    for path in held:
        if path.exists():
            release_hold(path.parent.parent, registry.stem)
            removed.append(str(path))
    if vault:
        _release_hold("", vault, registry.stem)
        removed.append(f"its hold in vault {vault}")
    try:
        mountpoint.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise RpfsError(f"cannot remove {mountpoint}: {e.strerror}") from None
    if registry.exists():
        registry.unlink()   # last: while it is there, rpfs jobs shows what is left to discard
        removed.append(str(registry))
    named = source or job
    return Discarded(target=str(target), was=was, removed=removed, vm=named.vm if named else "",
                     point_id=named.point_id if named else "", disk=named.disk if named else "")


def _wait_until_gone(mountpoint: Path, seconds: float) -> None:
    """A daemon whose image was just unmounted (by us, or by a discard that was killed) is still closing
    the partial file; it must be gone before anything is removed. Its pid file goes with it (a discard
    killed between its unmount and that file's removal left it: the mount is gone, so nothing else would)."""
    deadline = time.monotonic() + seconds
    while daemon.daemon_pid(mountpoint) is not None:
        if time.monotonic() > deadline:
            raise RpfsError(f"the instant restore's daemon (pid {daemon.daemon_pid(mountpoint)}) has not ended;"
                            " try again")
        time.sleep(0.05)
    daemon.forget_ended(mountpoint)
