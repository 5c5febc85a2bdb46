"""Jobs: every backup, restore, prune, gc and verify is recorded in the store while it runs and after.

A command refused before its work starts (an unknown VM, an existing target, a backup already running)
is not a job: nothing happened, and `rpfs jobs` must not fill with such failures. A command says when its
work starts (Job.begin); the record is written from then on.

A job whose process died shows as failed, not as running forever: the record keeps the pid and the
process start time (/proc/PID/stat), so a reused pid is not mistaken for the job.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator

from rpfs.errors import CorruptBlockError, RpfsError
from rpfs.host.processes import start_time
from rpfs.store.store import DatabaseError, Store

KIND = "jobs"
KEEP_JOBS = 1000          # the newest finished jobs kept; older ones are forgotten (`rpfs run` adds a
KEEP_DAYS = 90            # prune every 15 minutes), and so is any finished job older than this
TRIMMED_BY = {"backup", "prune", "gc", "push"}   # the writers forget old jobs; a restore, verify or check
# reads nothing of the job table: a damaged page there (bit rot) must not fail or crash them (LMDB aborts
# on some damaged B-tree pages: no exception to catch), nor let a restore fail where verify finds nothing


@dataclass
class Job:
    id: str
    kind: str                      # backup | restore | prune | gc | verify
    vm: str | None
    start: str
    end: str | None = None
    status: str = "running"        # running | succeeded | failed | cancelled
    bytes_read: int = 0
    bytes_written: int = 0
    recovery_point: str | None = None
    error: str | None = None
    pid: int = 0
    pid_start: str = ""

    def begin(self) -> None:
        """The command's checks are done and its work starts: record it from now on (once)."""
        starting, self._starting = getattr(self, "_starting", None), None
        if starting is not None:
            starting()


def _now() -> datetime:
    return datetime.now(timezone.utc)


@contextmanager
def recorded(store: Store, kind: str, vm: str | None = None, begun: bool = True) -> Iterator[Job]:
    """Record a job around a with-block; the block fills in bytes and the recovery point. Not begun, the
    block calls job.begin() once its checks pass: refused before that, nothing is recorded."""
    logged = False
    job = Job(id="", kind=kind, vm=vm, start="", pid=os.getpid(), pid_start=start_time(os.getpid()))

    def starting() -> None:
        nonlocal logged
        started = _now()
        job.id = f"{started.strftime('%Y%m%dT%H%M%S.%fZ')}-{os.getpid()}"
        job.start = started.isoformat(timespec="seconds")
        logged = _log(store, job)
        if logged and kind in TRIMMED_BY:
            try:
                _forget_old_jobs(store, started)
            except (DatabaseError, CorruptBlockError):
                pass   # a job table that cannot be read whole: rpfs check reports it; the command goes on
    job._starting = starting
    if begun:
        job.begin()
    try:
        yield job
        job.status = "succeeded"
    except KeyboardInterrupt:
        job.status, job.error = "cancelled", "interrupted"
        raise
    except RpfsError as e:
        job.status, job.error = "failed", e.message
        raise
    except BaseException as e:
        job.status, job.error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        job.end = _now().isoformat(timespec="seconds")
        if logged:
            _log(store, job)


def _log(store: Store, job: Job) -> bool:
    """Write the job's record. The job table is a log, not data: damage in it (bit rot in its B-tree pages
    or records) must not refuse the command it records, least of all a restore of intact data: the
    command goes on unrecorded (rpfs check reports the table; a failing command still says one line)."""
    try:
        store.put_record(KIND, job.id, asdict(job))
        return True
    except (DatabaseError, RpfsError):
        return False


def _job(record: dict) -> Job | None:
    try:
        return Job(**record)
    except TypeError:
        return None


def _running(job: Job) -> bool:
    """Still running: recorded so, and its process (the same one, not a reused pid) is alive."""
    return job.status == "running" and start_time(job.pid) == job.pid_start


def _forget_old_jobs(store: Store, now: datetime) -> None:
    """Keep the job table bounded: the newest KEEP_JOBS finished jobs, none older than KEEP_DAYS."""
    finished = sorted((name for name, record in store.records(KIND).items()
                       if (job := _job(record)) is None or not _running(job)),   # a damaged one goes too
                      reverse=True)   # ids start with the start time: newest first
    cutoff = (now - timedelta(days=KEEP_DAYS)).strftime("%Y%m%dT%H%M%S")
    old = finished[KEEP_JOBS:] + [name for name in finished[:KEEP_JOBS] if name < cutoff]
    if old:
        store.delete_records(KIND, old)


def list_jobs(store: Store, running_only: bool = False) -> list[Job]:
    found = []
    for record in store.records(KIND).values():
        job = _job(record)
        if job is None:
            continue   # a damaged record (bit rot): the job table is a log, not data; it is forgotten
        if job.status == "running" and not _running(job):
            job.status, job.error = "failed", job.error or "its process died"
        if not running_only or job.status == "running":
            found.append(job)
    return sorted(found, key=lambda j: j.id)
