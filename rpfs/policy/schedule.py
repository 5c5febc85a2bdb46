"""When a VM's next backup is due under its policy's schedule, and the systemd units that check.

A systemd timer runs `rpfs run` every few minutes; `run` backs up the VMs that are due. Due is worked out
from the last successful backup, not from when the timer fired, so a missed slot (host down, timer late,
backup failed) is caught up at the next run instead of skipped. All times are UTC.
"""
from __future__ import annotations

import hashlib
import shlex
from datetime import datetime, timedelta, timezone

from rpfs.errors import RpfsError
from rpfs.policy.policies import WEEKDAYS, Schedule


def next_due(schedule: Schedule, last_success: datetime | None, now: datetime) -> datetime:
    """The time the next backup is due; at or before `now` means it is due already (since then)."""
    now = _utc(now)
    if last_success is None:
        return now
    last_success = _utc(last_success)
    if schedule.kind == "hourly":
        return last_success + timedelta(hours=schedule.every_hours)
    if schedule.kind not in ("daily", "weekly"):
        raise RpfsError(f"unknown schedule kind {schedule.kind!r}")
    days = range(7) if schedule.kind == "daily" else [WEEKDAYS.index(day) for day in schedule.weekdays]
    if not days:
        raise RpfsError("a weekly schedule needs at least one weekday")
    hour, minute = (int(part) for part in schedule.at.split(":"))
    today = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    slots = [today + timedelta(days=offset) for offset in range(-7, 8)
             if (today + timedelta(days=offset)).weekday() in days]
    latest = max(slot for slot in slots if slot <= now)
    if latest > last_success:
        return latest                   # this slot has no backup yet
    return min(slot for slot in slots if slot > now)


def is_due(schedule: Schedule, last_success: datetime | None, now: datetime) -> bool:
    return next_due(schedule, last_success, now) <= _utc(now)


def stagger(vms: list[str], spread_seconds: int) -> dict[str, float]:
    """A fixed delay per VM in [0, spread_seconds), from a hash of its name, so VMs due at the same
    moment do not all read their disks at once, and each VM starts at the same offset every day."""
    if spread_seconds < 0:
        raise RpfsError("the stagger spread cannot be negative")
    delays = {}
    for vm in vms:
        fraction = int.from_bytes(hashlib.sha256(vm.encode()).digest()[:8], "big") / 2**64
        delays[vm] = fraction * spread_seconds
    return delays


def systemd_units(rpfs_command: str, store: str, interval: str = "*:0/15",
                  key_file: str | None = None) -> dict[str, str]:
    """The text of rpfs.service and rpfs.timer. `rpfs_command` is a command line (shell quoting), e.g.
    "/usr/local/bin/rpfs" or "/usr/bin/python3 -I -m rpfs"; `interval` is a systemd OnCalendar expression;
    key_file: the key file of an encrypted store (a timer has nobody to type a passphrase)."""
    for what, value in (("rpfs command", rpfs_command), ("store", store), ("interval", interval),
                        ("key file", key_file or "-")):
        if not value.strip() or any(c in value for c in "\n\r\0"):
            raise RpfsError(f"the {what} for the systemd units must be one non-empty line, not {value!r}")
    try:
        command = shlex.split(rpfs_command)
    except ValueError as e:
        raise RpfsError(f"cannot split the rpfs command {rpfs_command!r}: {e}") from None
    key_words = ["--key-file", key_file] if key_file else []
    exec_start = " ".join(_systemd_quote(word) for word in [*command, "--store", store, *key_words, "run"])
    service = ("[Unit]\n"
               "Description=rpfs: back up the VMs whose policy says a backup is due\n"
               "\n"
               "[Service]\n"
               "Type=oneshot\n"
               "WorkingDirectory=/\n"   # nothing of the folder `rpfs schedule` ran in (host/python_child.py)
               f"ExecStart={exec_start}\n")
    timer = ("[Unit]\n"
             "Description=rpfs: check for due backups\n"
             "\n"
             "[Timer]\n"
             f"OnCalendar={interval}\n"
             "Persistent=true\n"
             "RandomizedDelaySec=60\n"
             "\n"
             "[Install]\n"
             "WantedBy=timers.target\n")
    return {"rpfs.service": service, "rpfs.timer": timer}


def _systemd_quote(word: str) -> str:
    """systemd expands % specifiers and $ variables in ExecStart, and splits words at spaces."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC; aware ones are converted."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)
