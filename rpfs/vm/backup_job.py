"""A running domain's disks as the guest sees them at one moment: libvirt's backup API in pull mode, and the
checkpoints (QEMU dirty bitmaps) that say what changed since the previous point.

begin() starts a pull backup: qemu exports each disk over NBD on a unix socket, frozen at the moment begin
returns (what the guest writes later is copied first to a scratch file, so the export keeps the old bytes),
and creates a checkpoint (a bitmap in every disk) named by the caller. An incremental job also exports the
bitmap of what changed since an earlier checkpoint. A chain that cannot be trusted (checkpoint missing or
inconsistent, domain redefined, disk replaced) never fails the backup: begin gives a full job and says why.

Files, under a run folder (design: docs/design/vm-backup-job.md):

    RUN/                   root's, 0711: qemu (another user) passes through, nobody else lists or plants
    RUN/<uuid>.lock        flocked by the job of that domain while it runs: a free lock is a leftover
    RUN/<uuid>/            root's, 0711: the job's scratch files, scratch-<target>.qcow2 (libvirt creates
                           them and labels them for qemu)
    RUN/<uuid>/nbd/        qemu's (its DAC label), 0700: qemu binds nbd.sock here; nobody else can reach it
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr, escape

import libvirt
import libvirt_qemu

from rpfs.errors import RpfsError
from rpfs.host.access import check_trusted_place

DEFAULT_RUN_FOLDER = Path("/var/lib/rpfs-vm")   # on disk (scratch files grow), and qemu must pass through
CHECKPOINT_PREFIX = "rpfs-"
RUN_FOLDER_MODE = 0o711
SOCKET_NAME = "nbd.sock"
JOB_END_TIMEOUT = 30.0       # seconds a job is given to leave the domain once aborted


@dataclass(frozen=True)
class DiskIdentity:
    """What makes a disk the same disk as at the previous point: its source and its guest-visible size."""
    path: str
    size: int


@dataclass(frozen=True)
class ChainState:
    """What a point records of the chain its successor may continue: the domain and its disks then."""
    uuid: str
    disks: dict[str, DiskIdentity] = field(default_factory=dict)


@dataclass
class BackupJob:
    """A pull backup running on a domain: read its exports, then end() it (or leave the `with`)."""
    domain: libvirt.virDomain
    socket: str
    checkpoint: str
    incremental_from: str | None
    full_reason: str | None
    chain: ChainState
    disks: list[str]
    folder: Path
    _lock_fd: int = -1
    without_bitmap: frozenset[str] = frozenset()   # raw disks: read whole at every backup

    def export(self, target: str) -> str:
        """The NBD export name of a disk (libvirt names it by target)."""
        self._check(target)
        return target

    def bitmap_context(self, target: str) -> str | None:
        """The NBD meta context of a disk's changes since incremental_from; None for a full job or a disk
        without a bitmap. In it qemu flags the changed extents with bit 1 (dirty): qemu-img map --image-opts
        ...,x-dirty-bitmap= shows them as "data": false (and unchanged ones "data": true)."""
        self._check(target)
        return f"qemu:dirty-bitmap:backup-{target}" if self.incremental_from and target not in self.without_bitmap \
            else None

    def end(self) -> None:
        """Abort the job (a pull backup ends only so; the checkpoint stays), remove its socket and scratch
        files. Safe to call twice, and when the domain has gone."""
        try:
            _abort_backup(self.domain)
        finally:
            _remove_job_folder(self.folder)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def _check(self, target: str) -> None:
        if target not in self.disks:
            raise RpfsError(f"disk {target} is not in this backup (it has {', '.join(self.disks)})")

    def __enter__(self) -> BackupJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def chain_state(domain: libvirt.virDomain, disks: list[str]) -> ChainState:
    """The domain and its disks as they are now, to record on the point."""
    sources = _disk_sources(domain)
    return ChainState(uuid=domain.UUIDString(),
                      disks={t: DiskIdentity(sources.get(t, ""), domain.blockInfo(t)[0]) for t in disks})


def broken_chain_reason(now: ChainState, previous: ChainState | None, incremental_from: str,
                        known: list[str]) -> str | None:
    """Why the chain cannot continue from incremental_from, in one line; None when it can. known: the
    domain's rpfs checkpoints."""
    if previous is not None and previous.uuid != now.uuid:
        return f"the domain's UUID changed ({previous.uuid} -> {now.uuid}): it was redefined, a new chain"
    if incremental_from not in known:
        return f"checkpoint {incremental_from} is missing (deleted by hand, or the domain redefined): a new chain"
    if previous is not None:
        for target, disk in now.disks.items():
            before = previous.disks.get(target)
            if before is None:
                return f"disk {target} is new since the previous point: a new chain"
            if before.path != disk.path:
                return f"disk {target} was replaced ({before.path} -> {disk.path}): a new chain"
            if before.size != disk.size:
                return f"disk {target} changed size ({before.size} -> {disk.size} bytes): a new chain"
    return None


def begin(domain: libvirt.virDomain, disks: list[str], checkpoint: str, incremental_from: str | None,
          run_folder: Path = DEFAULT_RUN_FOLDER, previous: ChainState | None = None,
          without_bitmap: frozenset[str] = frozenset()) -> BackupJob:
    """prepare() then start(): for a caller that freezes nothing in between."""
    prepared = prepare(domain, disks, checkpoint, incremental_from, run_folder, previous, without_bitmap)
    try:
        return prepared.start()
    finally:
        prepared.release()


@dataclass
class PreparedJob:
    """A backup job made ready to begin: everything that may take time is done, so that the guest is frozen
    only around start(). release() undoes it if start() never ran (or failed)."""
    domain: libvirt.virDomain
    disks: list[str]
    checkpoint: str
    start_from: str | None
    full_reason: str | None
    now: ChainState
    run_folder: Path
    folder: Path
    socket: Path
    without_bitmap: frozenset[str]
    _lock_fd: int = -1

    def start(self) -> BackupJob:
        """libvirt's backupBegin: the exports show the guest-visible bytes at the moment this returns (the
        snapshot). A chain libvirt finds broken (qemu was killed) is dropped and a full job begun instead."""
        start_from, full_reason = self.start_from, self.full_reason
        try:
            try:
                _backup_begin(self.domain, self.disks, self.checkpoint, start_from, self.socket, self.folder,
                              self.without_bitmap)
            except libvirt.libvirtError as e:
                if start_from is None or not _is_broken_chain(e):
                    raise RpfsError(f"cannot start the backup of {self.domain.name()}: {_message(e)}") from None
                full_reason = f"{_message(e)} (qemu killed, or the host crashed?): a new chain"
                start_from = None
                _drop_chain(self.domain)
                _remove_job_folder(self.folder)   # a fresh scratch file: libvirt makes it anew
                self.socket = _make_job_folder(self.domain, self.folder)
                _backup_begin(self.domain, self.disks, self.checkpoint, None, self.socket, self.folder,
                              self.without_bitmap)
        except libvirt.libvirtError as e:
            raise RpfsError(f"cannot start the backup of {self.domain.name()}: {_message(e)}") from None
        job = BackupJob(self.domain, str(self.socket), self.checkpoint, start_from, full_reason, self.now,
                        list(self.disks), self.folder, self._lock_fd, self.without_bitmap)
        self._lock_fd = -1   # the job's now: end() lets it go
        return job

    def release(self) -> None:
        if self._lock_fd >= 0:
            _remove_job_folder(self.folder)
            os.close(self._lock_fd)
            self._lock_fd = -1


def prepare(domain: libvirt.virDomain, disks: list[str], checkpoint: str, incremental_from: str | None,
            run_folder: Path = DEFAULT_RUN_FOLDER, previous: ChainState | None = None,
            without_bitmap: frozenset[str] = frozenset()) -> PreparedJob:
    """Make ready a pull backup of disks (targets) and a checkpoint named `checkpoint`
    (rpfs-<point id>-<random>); PreparedJob.start() begins it (the caller freezes the guest around that).

    Incremental from `incremental_from` when the chain holds (previous: what the point of that checkpoint
    recorded, chain_state); otherwise a full job with full_reason set, and every rpfs checkpoint of the
    domain deleted first (none can be trusted to continue from). The caller serializes backups of one
    domain: any backup job found on the domain with our socket folder is a stale one of a killed rpfs, and
    is aborted. without_bitmap: disks that cannot keep a bitmap (raw images): always read whole, left out
    of the checkpoint."""
    if not checkpoint.startswith(CHECKPOINT_PREFIX):
        raise RpfsError(f"checkpoint name {checkpoint!r} must start with {CHECKPOINT_PREFIX!r}")
    if not disks:
        raise RpfsError("no disk to back up")
    run_folder = _make_run_folder(run_folder)
    uuid = domain.UUIDString()
    lock_fd = _lock_job(run_folder, uuid)
    try:
        _abort_stale_job(domain, run_folder)
        if checkpoint in checkpoints(domain):
            _delete_checkpoint(domain, checkpoint)   # only if a caller gives a name twice (rpfs adds a random part)
        folder = run_folder / uuid
        _remove_job_folder(folder)
        socket = _make_job_folder(domain, folder)
        now = chain_state(domain, disks)
        full_reason = None
        if incremental_from is not None:
            full_reason = broken_chain_reason(now, previous, incremental_from, checkpoints(domain))
            if full_reason is not None:
                _drop_chain(domain)
        start_from = incremental_from if full_reason is None else None
        prepared = PreparedJob(domain, list(disks), checkpoint, start_from, full_reason, now, run_folder, folder,
                               socket, without_bitmap, lock_fd)
        lock_fd = -1
        return prepared
    except libvirt.libvirtError as e:
        raise RpfsError(f"cannot prepare the backup of {domain.name()}: {_message(e)}") from None
    finally:
        if lock_fd >= 0:
            _remove_job_folder(run_folder / uuid)
            os.close(lock_fd)


def checkpoints(domain: libvirt.virDomain) -> list[str]:
    """The domain's rpfs checkpoints, oldest first (rpfs's chains are linear: topological order is age)."""
    found = domain.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    return [c.getName() for c in found if c.getName().startswith(CHECKPOINT_PREFIX)]


def delete_checkpoints(domain: libvirt.virDomain, keep: set[str]) -> list[str]:
    """Delete the rpfs checkpoints not in keep, oldest first, so a domain never accumulates bitmaps. One
    libvirt cannot delete (its bitmap is gone or broken) loses its metadata only, and its bitmap, if qemu
    still has one, is removed through the monitor. Returns one line per metadata-only deletion."""
    notes = []
    for name in checkpoints(domain):
        if name in keep:
            continue
        try:
            domain.checkpointLookupByName(name).delete(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                continue
            domain.checkpointLookupByName(name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            notes.append(f"checkpoint {name}: metadata deleted only ({_message(e)})")
    _remove_stray_bitmaps(domain)
    return notes


def _delete_checkpoint(domain: libvirt.virDomain, name: str) -> None:
    """Delete one checkpoint (its bitmap merged into its parent's), only libvirt's record of it when qemu's
    bitmap is gone."""
    try:
        domain.checkpointLookupByName(name).delete(0)
    except libvirt.libvirtError:
        domain.checkpointLookupByName(name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        _remove_stray_bitmaps(domain)


def leftovers(run_folder: Path = DEFAULT_RUN_FOLDER) -> list[str]:
    """Job folders (sockets, scratch files) of backups whose rpfs is gone: their lock is free."""
    found = []
    try:
        entries = sorted(os.scandir(run_folder), key=lambda e: e.name)
    except (FileNotFoundError, PermissionError):   # none yet, or not root's to look at
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(run_folder / f"{entry.name}.lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:   # a folder with no lock file never had a live job: a leftover
            found.append(entry.path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found.append(entry.path)
        except BlockingIOError:
            pass   # a live backup's
        finally:
            os.close(fd)
    return found


def clean(connection: libvirt.virConnect, run_folder: Path = DEFAULT_RUN_FOLDER) -> list[str]:
    """Remove what killed backups left: abort the stale backup job still on its domain, remove its folder.
    Returns one line per thing cleaned."""
    done = []
    for path in leftovers(run_folder):
        uuid = os.path.basename(path)
        fd = _try_lock(run_folder / f"{uuid}.lock")
        if fd is None:
            continue   # a backup started meanwhile
        try:
            try:
                domain = connection.lookupByUUIDString(uuid)
            except libvirt.libvirtError:
                domain = None
            try:
                if domain is not None and _abort_stale_job(domain, run_folder):
                    done.append(f"aborted the backup job left on {domain.name()}")
            except RpfsError as e:
                done.append(e.message)   # another tool's job: left alone, said
            _remove_job_folder(Path(path))
            done.append(f"removed {path}")
        finally:
            os.close(fd)
    return done


# -- the job on the domain


def _backup_begin(domain: libvirt.virDomain, disks: list[str], checkpoint: str, start_from: str | None,
                  socket: Path, folder: Path, without_bitmap: frozenset[str]) -> None:
    every = list(_disk_sources(domain)) or disks
    unknown = [t for t in disks if t not in every]
    if unknown:
        raise RpfsError(f"{domain.name()} has no disk {', '.join(unknown)}")
    backup = ["<domainbackup mode='pull'>"]
    if start_from is not None:
        backup.append(f"<incremental>{escape(start_from)}</incremental>")
    backup.append(f"<server transport='unix' socket={quoteattr(str(socket))}/><disks>")
    point = [f"<domaincheckpoint><name>{escape(checkpoint)}</name><disks>"]
    for target in every:
        if target in disks:
            scratch = folder / f"scratch-{target}.qcow2"
            whole = " backupmode='full'" if target in without_bitmap and start_from is not None else ""
            backup.append(f"<disk name={quoteattr(target)} backup='yes' type='file'{whole}>"
                          f"<scratch file={quoteattr(str(scratch))}/></disk>")
            point.append(f"<disk name={quoteattr(target)} checkpoint="
                         f"{quoteattr('no' if target in without_bitmap else 'bitmap')}/>")
        else:
            backup.append(f"<disk name={quoteattr(target)} backup='no'/>")
            point.append(f"<disk name={quoteattr(target)} checkpoint='no'/>")
    backup.append("</disks></domainbackup>")
    point.append("</disks></domaincheckpoint>")
    domain.backupBegin("".join(backup), "".join(point), 0)


def _is_broken_chain(e: libvirt.libvirtError) -> bool:
    text = _message(e)
    return (e.get_error_code() in (libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT, libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT)
            or "bitmap" in text or "checkpoint" in text)


def _drop_chain(domain: libvirt.virDomain) -> None:
    """A new chain starts: every rpfs checkpoint goes (none can be trusted to continue from)."""
    delete_checkpoints(domain, keep=set())


def _backup_job_socket(domain: libvirt.virDomain) -> str | None:
    """The socket of the backup job running on the domain, "" for one without a unix socket; None if none."""
    try:
        stats = domain.jobStats(0)
    except libvirt.libvirtError:
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE \
            or stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
        return None
    try:
        server = ET.fromstring(domain.backupGetXMLDesc(0)).find("server")
    except (libvirt.libvirtError, ET.ParseError):
        return None   # the job ended meanwhile
    return server.get("socket", "") if server is not None else ""


def _abort_stale_job(domain: libvirt.virDomain, run_folder: Path) -> bool:
    """Abort a backup job of a killed rpfs on the domain (its socket in our run folder); refuse another's."""
    socket = _backup_job_socket(domain)
    if socket is None:
        return False
    if Path(socket).parent.parent.parent != run_folder:
        raise RpfsError(f"{domain.name()} has a backup job rpfs did not start (socket {socket or 'none'}); "
                        f"end it with: virsh domjobabort {domain.name()}")
    _abort_backup(domain)
    return True


def _abort_backup(domain: libvirt.virDomain) -> None:
    """Abort the domain's backup job and wait (bounded) until libvirt says it is gone."""
    try:
        domain.abortJob()
    except libvirt.libvirtError as e:
        if _backup_job_socket(domain) is None:
            return   # no job (ended, or the domain stopped)
        raise RpfsError(f"cannot end the backup job of {domain.name()}: {_message(e)}") from None
    deadline = time.monotonic() + JOB_END_TIMEOUT
    while _backup_job_socket(domain) is not None:
        if time.monotonic() > deadline:
            raise RpfsError(f"the backup job of {domain.name()} did not end in {JOB_END_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _remove_stray_bitmaps(domain: libvirt.virDomain) -> None:
    """Remove qemu's rpfs-* bitmaps that no checkpoint names (left by a metadata-only deletion)."""
    if not domain.isActive():
        return
    names = set(checkpoints(domain))
    nodes = _qmp(domain, "query-named-block-nodes", {"flat": True})
    for node in nodes:
        for bitmap in node.get("dirty-bitmaps") or []:
            name = bitmap.get("name", "")
            if name.startswith(CHECKPOINT_PREFIX) and name not in names:
                _qmp(domain, "block-dirty-bitmap-remove", {"node": node["node-name"], "name": name})


def _qmp(domain: libvirt.virDomain, command: str, arguments: dict) -> list | dict:
    answer = libvirt_qemu.qemuMonitorCommand(domain, json.dumps({"execute": command, "arguments": arguments}), 0)
    return json.loads(answer).get("return", {})


def _disk_sources(domain: libvirt.virDomain) -> dict[str, str]:
    """target -> source path of every disk of the running domain, in the XML's order."""
    found = {}
    for disk in ET.fromstring(domain.XMLDesc(0)).iter("disk"):
        target = disk.find("target")
        if target is None or target.get("dev") is None:
            continue
        source = disk.find("source")
        path = "" if source is None else (source.get("file") or source.get("dev") or source.get("name") or "")
        found[target.get("dev")] = path
    return found


def _qemu_owner(domain: libvirt.virDomain) -> tuple[int, int]:
    """uid, gid qemu runs as: the domain's DAC label (+64055:+64055), as libvirt set it."""
    for label in ET.fromstring(domain.XMLDesc(0)).iter("seclabel"):
        if label.get("model") == "dac" and label.find("label") is not None:
            uid, _, gid = (label.find("label").text or "").partition(":")
            try:
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
            except ValueError:
                break
    return 0, 0   # no DAC label: qemu runs as root


def _message(e: libvirt.libvirtError) -> str:
    return " ".join((e.get_error_message() or str(e)).split())


# -- the run folder


def _make_run_folder(run_folder: Path) -> Path:
    """RUN, root's 0711: qemu may pass through, nobody else may list it or plant in it."""
    run_folder = Path(os.path.abspath(run_folder))
    check_trusted_place(run_folder, "backup run folder", private=True)
    try:
        os.mkdir(run_folder, RUN_FOLDER_MODE)
    except FileExistsError:
        pass
    st = os.lstat(run_folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RpfsError(f"{run_folder} is not a folder of this user's (a link, or someone else's); remove it")
    if stat.S_IMODE(st.st_mode) != RUN_FOLDER_MODE:
        os.chmod(run_folder, RUN_FOLDER_MODE)
    return run_folder


def _make_job_folder(domain: libvirt.virDomain, folder: Path) -> Path:
    """RUN/<uuid> (root's 0711, the scratch files) and RUN/<uuid>/nbd (qemu's 0700, its socket)."""
    socket = folder / "nbd" / SOCKET_NAME
    if len(os.fsencode(socket)) > 107:   # sun_path holds 108 bytes with its NUL
        raise RpfsError(f"the backup run folder {folder.parent} is too deep for a unix socket; choose a shorter one")
    os.mkdir(folder, RUN_FOLDER_MODE)
    os.chmod(folder, RUN_FOLDER_MODE)   # whatever the umask
    nbd = folder / "nbd"
    os.mkdir(nbd, 0o700)
    os.chown(nbd, *_qemu_owner(domain))
    return socket


def _remove_job_folder(folder: Path) -> None:
    """Remove a job folder and what is in it, never following a link (rmtree works by descriptors)."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass


def _lock_job(run_folder: Path, uuid: str) -> int:
    fd = _try_lock(run_folder / f"{uuid}.lock")
    if fd is None:
        raise RpfsError(f"a backup of the domain {uuid} is running (its lock {run_folder / uuid}.lock is held)")
    return fd


def _try_lock(path: Path) -> int | None:
    """The lock file opened and flocked, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
