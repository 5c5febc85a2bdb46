"""The moment a backup is taken: pre-scripts -> freeze -> snapshot -> thaw -> post-scripts.

Decides which path each disk is read from (its snapshot, or the live disk), and how consistent the
recovery point is:
  application   pre- and post-scripts configured and succeeded, snapshot taken
  file-system   snapshot taken with the configured filesystems frozen, no scripts (or one failed
                with continue_on_failure)
  crash         snapshot taken without freezing, or the disks were not in use
  inconsistent  a disk in use was read live (only with allow_live)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rpfs.backup import snapshot
from rpfs.backup.quiesce import ConsistencyConfig, frozen, run_script
from rpfs.errors import RpfsError
from rpfs.host.disk_use import in_use


@dataclass
class PreparedDisks:
    read_from: dict[str, Path]                       # per disk: its snapshot, or the live disk
    snapshots: dict[str, Path] = field(default_factory=dict)
    consistency: str = "crash"
    record: dict = field(default_factory=dict)       # what happened, kept on the recovery point


def prepare(vm: str, disks: dict[str, Path], snapshot_id: str, config: ConsistencyConfig | None,
            allow_live: bool) -> PreparedDisks:
    """Quiesce, snapshot and thaw; the caller reads prepared.read_from and deletes the snapshots."""
    config = config or ConsistencyConfig()
    record: dict = {}
    scripts_ok = config.pre is not None and config.post is not None
    if config.pre is not None:
        pre = run_script(config.pre, "pre")
        record["pre"] = asdict(pre)
        if not pre.ok:
            scripts_ok = False
            if not config.pre.continue_on_failure:
                _run_post(config, record)   # let the application resume whatever the pre-script did
                raise RpfsError(f"pre-script {pre.script} failed ({pre.message}); no backup was taken"
                                " (set continue_on_failure to back up anyway)")
    snapshots: dict[str, Path] = {}
    cannot: dict[str, str] = {}
    try:
        with frozen(config.freeze, config.freeze_max_seconds) as window:
            for name, path in disks.items():   # one right after the other, all inside the window
                try:
                    snapshots.update(snapshot.take({name: path}, vm, snapshot_id))
                except snapshot.CannotSnapshot as e:
                    cannot[name] = str(e)
        if config.freeze:
            record["freeze"] = window.record()
    except BaseException:
        snapshot.delete(snapshots.values())
        _run_post(config, record)
        raise
    try:
        if config.post is not None and not _run_post(config, record):
            scripts_ok = False
        live = {name: in_use(disks[name]) for name in cannot}
    except BaseException:
        snapshot.delete(snapshots.values())
        raise
    busy = {name: reason for name, reason in live.items() if reason}
    if busy and not allow_live:
        snapshot.delete(snapshots.values())
        name, reason = next(iter(busy.items()))
        raise RpfsError(f"disk {name}: {reason}, and it cannot be snapshotted ({cannot[name]}); stop what uses it,"
                        " or back it up anyway with --allow-live (recorded as inconsistent)")
    if cannot:
        record["read_live"] = {name: busy.get(name) or "not in use" for name in cannot}
    frozen_ok = bool(config.freeze) and not record.get("freeze", {}).get("watchdog_stepped_in")
    if busy:
        consistency = "inconsistent"
    elif scripts_ok:
        consistency = "application"
    elif frozen_ok:
        consistency = "file-system"
    else:
        consistency = "crash"
    read_from = {name: snapshots.get(name, path) for name, path in disks.items()}
    return PreparedDisks(read_from, snapshots, consistency, record)


def _run_post(config: ConsistencyConfig, record: dict) -> bool:
    if config.post is None:
        return True
    post = run_script(config.post, "post")
    record["post"] = asdict(post)
    return post.ok
