"""`rpfs check [--read-data] [--repair]`: is the store whole and consistent, and was anything left behind?

What borg check and restic check are to theirs. It recounts every block's references from the block
maps and compares them with `refs`; finds every referenced block and checks its frame's CRC (with
--read-data, decodes it and checks its SHA-256 too); and looks for what a killed process leaves:
snapshots no recovery point records, holds of instant restores that are gone, lease files of dead
readers, run-dir records of dead daemons, whole-VM attaches with nothing attached, instant restores
killed while finishing, the job folder (and the job still on the domain) and the image export of a killed
`rpfs backup --libvirt`, the read-only attach of a killed `rpfs catalog` or `restore-files`. It checks the
catalogs of files too (docs/design/catalog.md): every record decodes, every listing a record reaches is
there and matches its id, listing_refs equal a recount and no stored listing is unreachable. --repair
rebuilds `refs` and `listing_refs` from the maps and records, removes a damaged catalog (the point stays:
`rpfs catalog VM ID` makes its catalog anew) and the leftovers. It never deletes a block: a referenced
block is data, an unreferenced one is gc's to remove.

It runs under the writer lock, so no backup, prune or gc changes the maps or `refs` meanwhile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rpfs.attach import for_command
from rpfs.attach.filesystems import has_attached
from rpfs.attach.vm import release_attach
from rpfs.backup import snapshot
from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.restore.partial import partial_path, settle, state_path
from rpfs.host import run_dir
from rpfs.store import blob
from rpfs.store.catalogs import Catalog, CatalogView, count_references, decode_listing
from rpfs.store.leases import holds, release_hold, stale_leases
from rpfs.store.store import WRITER_WAIT_SECONDS, DatabaseError, Store
from rpfs.vm import backup_job, image_export, libvirt_host


@dataclass
class Problem:
    kind: str   # map | refs | block | table | records | catalog | snapshot | hold | lease | run-dir | instant
                # | vm-job
    what: str                 # one line, for the user
    repaired: bool = False
    repair: Callable[[], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class CheckResult:
    recovery_points: int = 0
    checked_blocks: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]


def check(store: Store, read_data: bool = False, repair: bool = False, progress=None) -> CheckResult:
    result = CheckResult()
    with store.writer_lock("check", wait_seconds=WRITER_WAIT_SECONDS):
        points = store.points()
        result.recovery_points = len(points)
        counts, piece_counts, damaged = store.recount()
        result.problems += [Problem("map", f"{message} (rpfs verify names the recovery point)") for message in damaged]
        result.problems += _refs(store, counts, piece_counts, can_repair=not damaged)
        result.problems += _blocks(store, counts, read_data, result, progress)
        result.problems += _tables(store)
        result.problems += _records(store)
        try:
            result.problems += _catalogs(store, {(p.vm, p.id) for p in points})
        except DatabaseError as e:   # a damaged page of the catalog tables (named by _tables too)
            result.problems.append(Problem("catalog", f"the catalogs cannot be read whole: {e}"))
        result.problems += _snapshots(store, points)
        result.problems += _holds(store, {(p.vm, p.id) for p in points})
        result.problems += [Problem("lease", f"lease file {path} of a reader that died",
                                    repair=lambda path=path: path.unlink(missing_ok=True))
                            for path in stale_leases(store.path)]
        result.problems += _run_dir(store)
        result.problems += [Problem("run-dir", f"read-only attach {path} of a killed rpfs catalog or restore-files",
                                    repair=for_command.clean_leftovers) for path in for_command.leftovers()]
        result.problems += _vm_leftovers()
        if repair:
            for problem in result.problems:
                if problem.repair is not None:
                    try:
                        problem.repair()
                    except RpfsError as e:   # one repair that cannot be done now stops none of the others
                        problem.what += f" (not repaired: {e.message})"
                        continue
                    problem.repaired = True
    return result


def _refs(store: Store, counts: dict[bytes, int], piece_counts: dict[bytes, int], can_repair: bool) -> list[Problem]:
    """refs and piece_refs against a recount; rewritten by --repair unless a block map could not be read
    whole (its blocks could not be counted, and a recount without them could let gc free them)."""
    stored, stored_pieces = store.ref_counts()
    problems = []
    for what, want, have in (("block", counts, stored), ("block map piece", piece_counts, stored_pieces)):
        wrong = [d for d in want.keys() | have.keys() if want.get(d, 0) != have.get(d, 0)]
        if wrong:
            first = min(wrong)
            problems.append(Problem("refs", f"the count is wrong for {len(wrong)} {what}(s) (first {first.hex()[:16]}:"
                                            f" says {have.get(first, 0)}, it is named {want.get(first, 0)} time(s))",
                                    repair=(lambda: store.replace_refs(counts, piece_counts)) if can_repair else None))
    return problems[:1] if len(problems) == 2 and can_repair else problems


def _blocks(store: Store, counts: dict[bytes, int], read_data: bool, result: CheckResult,
            progress) -> list[Problem]:
    """Every referenced block there, its frame sound (and with read_data its content right)."""
    def inspect(stored: memoryview) -> str | None:
        try:
            if not read_data:
                blob.check_crc(stored)
                return None
            store.codec.decode(digest, stored)
            return None
        except CorruptBlockError as e:
            return e.message
    problems = []
    for n, digest in enumerate(sorted(counts), 1):
        found = store.get_blob(digest, lambda stored: inspect(stored) or "")   # None: not there
        found = "is missing" if found is None else found
        result.checked_blocks += 1
        if found:
            problems.append(Problem("block", f"block {digest.hex()[:16]} {found.removeprefix('stored block ')}"
                                             " (rpfs verify names the recovery points that need it)"))
        if progress:
            progress(n, len(counts))
    return problems


def _tables(store: Store) -> list[Problem]:
    """Every table walked in order, each key found again by a lookup (Store.table_damage)."""
    return [Problem("table", f"the {name} table is damaged: {damage}") for name in store.table_names()
            if (damage := store.table_damage(name))]


def _records(store: Store) -> list[Problem]:
    """The tables of JSON records (policies, protected VMs, jobs) read whole: a damaged record there fails
    every command that reads the table (each command records a job)."""
    problems = []
    for kind in ("policies", "protected", "jobs"):
        try:
            store.records(kind)
        except (DatabaseError, CorruptBlockError) as e:
            problems.append(Problem("records", f"the {kind} table cannot be read whole: {getattr(e, 'message', e)}"))
    return problems


def _catalogs(store: Store, existing: set[tuple[str, str]]) -> list[Problem]:
    """Each catalog record decodes and reaches only listings that are there and match their ids (a point with
    a damaged catalog is named; --repair removes that catalog); listing_refs equal a recount from the
    records, and every stored listing is reachable (--repair sets both from a recount of its own). All read
    in one transaction: a catalog stored meanwhile (rpfs catalog takes no writer lock) is seen whole or not."""
    try:
        opened = store.catalog_view()
    except RpfsError:
        return []   # a store before format 7 has no catalogs
    with opened as view:
        return _catalog_problems(store, view, existing)


def _catalog_problems(store: Store, view: CatalogView, existing: set[tuple[str, str]]) -> list[Problem]:
    problems = []
    records, walk = [], _ListingWalk(view)
    keys = view.keys()
    problems += [Problem("catalog", f"a catalog record has a damaged key ({key[0]!r})")
                 for key in keys if len(key) != 2]
    for vm, point_id in (key for key in keys if len(key) == 2):
        anew = f" (--repair removes it; the point stays: rpfs catalog {vm} {point_id} makes it anew)"
        try:
            record = view.record(vm, point_id)
        except (RpfsError, DatabaseError) as e:
            problems.append(_damaged_catalog(store, vm, point_id, f"{getattr(e, 'message', e)}{anew}"))
            continue
        if record is None:   # listed by a walk of the table, not found by its key: the table is damaged
            problems.append(Problem("catalog", f"the catalog of {vm}/{point_id} is listed but cannot be found"))
            continue
        if (vm, point_id) not in existing:
            problems.append(_damaged_catalog(store, vm, point_id, f"the catalog of {vm}/{point_id} is of a point that"
                                                                   " does not exist (--repair removes it)"))
            continue
        damage = walk.damage(record)
        if damage:
            problems.append(_damaged_catalog(store, vm, point_id, f"catalog of {vm}/{point_id}: {damage}{anew}"))
        else:
            records.append(record)
    if problems:
        return problems   # the counts are recounted when the damaged catalogs are removed
    counts = count_references(records, walk.read)
    stored = view.ref_counts()
    wrong = [i for i in counts.keys() | stored.keys() if counts.get(i, 0) != stored.get(i, 0)]
    if wrong:
        first = min(wrong)
        problems.append(Problem("refs", f"the count is wrong for {len(wrong)} catalog listing(s) (first"
                                        f" {first.hex()[:16]}: says {stored.get(first, 0)}, it is named"
                                        f" {counts.get(first, 0)} time(s))", repair=lambda: _recount_listings(store)))
    unreachable = [i for i in view.listing_ids() if i not in counts]
    if unreachable:
        problems.append(Problem("catalog", f"{len(unreachable)} stored catalog listing(s) that no catalog reaches"
                                           f" (first {min(unreachable).hex()[:16]})",
                                repair=lambda: _recount_listings(store)))
    return problems


class _ListingWalk:
    """Every listing a catalog record reaches, each read (and checked against its id) once, whichever
    point's catalog reaches it first: the damage found there is every such point's."""

    def __init__(self, view: CatalogView):
        self.view = view
        self.found: dict[bytes, bytes | str] = {}   # listing id -> its bytes, or what is wrong with it

    def read(self, listing_id: bytes) -> bytes:
        found = self._get(listing_id)
        if isinstance(found, str):
            raise CorruptBlockError(found)
        return found

    def damage(self, record: Catalog) -> str | None:
        """What is wrong with the first listing of the record that is missing or damaged, or None."""
        seen: set[bytes] = set()
        pending = list(record.roots())
        while pending:
            listing_id = pending.pop()
            if listing_id in seen:
                continue
            seen.add(listing_id)
            found = self._get(listing_id)
            if isinstance(found, str):
                return found
            pending += [e.folder for e in decode_listing(found, "a listing") if e.folder]
        return None

    def _get(self, listing_id: bytes) -> bytes | str:
        if listing_id not in self.found:
            try:
                raw = self.view.listing_bytes(listing_id, "it")
                decode_listing(raw, "a listing")
                self.found[listing_id] = raw
            except (CorruptBlockError, DatabaseError) as e:
                what = "missing" if "is missing" in str(getattr(e, "message", "")) else "damaged"
                self.found[listing_id] = f"a listing is {what} ({listing_id.hex()[:16]})"
        return self.found[listing_id]


def _recount_listings(store: Store) -> None:
    """Set listing_refs from a recount of the records (Store.repair_listing_refs: one transaction)."""
    if store.repair_listing_refs() is None:
        raise RpfsError("a catalog is damaged; rpfs check --repair again removes it first")


def _damaged_catalog(store: Store, vm: str, point_id: str, what: str) -> Problem:
    def repair() -> None:
        store.delete_catalog(vm, point_id)
        store.repair_listing_refs()   # left alone while another damaged catalog is still there
    return Problem("catalog", what, repair=repair)


def _snapshots(store: Store, points) -> list[Problem]:
    """Snapshot files beside the disks' images that no recovery point records (a killed backup's)."""
    recorded = {Path(p) for point in points if point.snapshot for p in point.snapshot.paths.values()}
    images: dict[str, set[Path]] = {}
    for point in points:
        images.setdefault(point.vm, set()).update(Path(d.source) for d in point.disks if d.source)
    return [Problem("snapshot", f"snapshot {path} that no recovery point records",
                    repair=lambda path=path: snapshot.delete([path]))
            for vm, paths in sorted(images.items()) for path in snapshot.orphans(sorted(paths), vm, recorded)]


def _holds(store: Store, existing: set[tuple[str, str]]) -> list[Problem]:
    problems = []
    for name, (vm, point_id, target) in holds(store.path).items():
        if (vm, point_id) not in existing:
            why = f"recovery point {vm}/{point_id} no longer exists"
        elif target is not None and not state_path(Path(target)).exists():
            why = f"the instant restore into {target} is finished or gone"
        else:
            continue
        problems.append(Problem("hold", f"hold {name} keeps {vm}/{point_id} from prune, but {why}",
                                repair=lambda name=name: release_hold(store.path, name)))
    return problems


def _run_dir(store: Store) -> list[Problem]:
    """What dead daemons and killed commands left in the run dir (for this store, or for none)."""
    problems = []
    for pid_file in sorted(run_dir.root().glob("mount-*.pid")):
        if not _alive_rpfs(pid_file):
            problems.append(Problem("run-dir", f"pid file {pid_file} of a daemon that is gone",
                                    repair=lambda p=pid_file: p.unlink(missing_ok=True)))
    for record in run_dir.instant_records():
        target = _read(record).get("target")
        if target and state_path(Path(target)).exists() and not partial_path(Path(target)).exists() \
                and Path(target).exists():
            problems.append(Problem("instant", f"the instant restore into {target} was killed while finishing"
                                               " (its copy is whole)", repair=lambda t=Path(target): settle(t)))
    for record in sorted((run_dir.root() / "attach").glob("*.json")):
        dest, mountpoint = _read(record).get("dest"), record.with_suffix("")
        if dest and Path(dest).parent == for_command.folder():
            continue   # a command's own attach: its lock file says whether it is left over (below)
        if dest and not has_attached(Path(dest)):
            problems.append(Problem("run-dir", f"whole-VM attach record for {dest}, with nothing attached",
                                    repair=lambda r=record, m=mountpoint: release_attach(r, m)))
    return problems


def _vm_leftovers() -> list[Problem]:
    """What a killed `rpfs backup --libvirt` left, whatever the store: a job folder (scratch files, socket) in
    the backup run folder, its job maybe still on the domain (the next backup of that domain aborts it too),
    and a shut-off domain's export folder in the run dir (its server died with rpfs)."""
    problems = [Problem("vm-job", f"backup job folder {path} of a killed rpfs backup --libvirt (its job may"
                                  " still run on the domain)", repair=_clean_vm_jobs)
                for path in backup_job.leftovers()]
    problems += [Problem("run-dir", f"image export folder {path} of a killed rpfs",
                         repair=lambda path=path: image_export.remove_orphan(path))
                 for path in image_export.orphans()]
    return problems


def _clean_vm_jobs() -> None:
    """Abort the stale jobs on their domains and remove the job folders (all of them: one connection)."""
    if not backup_job.leftovers():
        return   # an earlier problem's repair cleaned them all
    connection = libvirt_host.connect()   # libvirtd not running: an RpfsError, the problem left unrepaired
    try:
        backup_job.clean(connection)
    finally:
        connection.close()


def _alive_rpfs(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
        return b"rpfs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _read(record: Path) -> dict:
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return {}

