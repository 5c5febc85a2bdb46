"""When backups are due, per-VM stagger, and the systemd units."""
from datetime import datetime, timedelta, timezone

import pytest

from rpfs.errors import RpfsError
from rpfs.policy.policies import Schedule
from rpfs.policy.schedule import is_due, next_due, stagger, systemd_units


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


DAILY = Schedule(kind="daily", at="02:00")
WEEKLY = Schedule(kind="weekly", at="03:30", weekdays=["mon", "thu"])   # 2024-01-01 is a Monday


def test_never_backed_up_is_due_now():
    now = utc("2024-01-03 10:00")
    for schedule in (DAILY, WEEKLY, Schedule(kind="hourly", every_hours=6)):
        assert next_due(schedule, None, now) == now
        assert is_due(schedule, None, now)


@pytest.mark.parametrize("last, now, due", [
    ("2024-01-02 02:05", "2024-01-02 10:00", "2024-01-03 02:00"),   # today's slot done: tomorrow
    ("2024-01-01 02:05", "2024-01-02 10:00", "2024-01-02 02:00"),   # today's slot missed: due since 02:00
    ("2024-01-01 02:05", "2024-01-02 01:59", "2024-01-02 02:00"),   # not yet
    ("2024-01-01 02:05", "2024-01-02 02:00", "2024-01-02 02:00"),   # exactly at the slot
    ("2023-12-20 02:05", "2024-01-02 10:00", "2024-01-02 02:00"),   # many missed: one catch-up, latest slot
    ("2024-01-02 01:00", "2024-01-02 10:00", "2024-01-02 02:00"),   # last ran before today's slot
])
def test_daily(last, now, due):
    assert next_due(DAILY, utc(last), utc(now)) == utc(due)
    assert is_due(DAILY, utc(last), utc(now)) == (utc(due) <= utc(now))


@pytest.mark.parametrize("last, now, due", [
    ("2024-01-01 04:00", "2024-01-02 10:00", "2024-01-04 03:30"),   # Monday done: Thursday
    ("2024-01-01 04:00", "2024-01-05 10:00", "2024-01-04 03:30"),   # Thursday missed: due
    ("2024-01-04 04:00", "2024-01-06 10:00", "2024-01-08 03:30"),   # Thursday done: next Monday
    ("2023-12-28 04:00", "2024-01-01 03:00", "2024-01-01 03:30"),   # Monday, not yet
    ("2023-12-28 04:00", "2024-01-01 03:30", "2024-01-01 03:30"),   # Monday, now
])
def test_weekly(last, now, due):
    assert next_due(WEEKLY, utc(last), utc(now)) == utc(due)


def test_hourly():
    every6 = Schedule(kind="hourly", every_hours=6)
    last = utc("2024-01-01 01:10")
    assert next_due(every6, last, utc("2024-01-01 05:00")) == utc("2024-01-01 07:10")
    assert not is_due(every6, last, utc("2024-01-01 07:09"))
    assert is_due(every6, last, utc("2024-01-01 07:10"))
    assert is_due(every6, last, utc("2024-01-03 00:00"))


def test_times_in_other_zones_are_compared_in_utc():
    plus2 = timezone(timedelta(hours=2))
    now = datetime(2024, 1, 2, 3, 30, tzinfo=plus2)                   # 01:30 UTC: before the 02:00 slot
    assert not is_due(DAILY, utc("2024-01-01 02:05"), now)
    assert next_due(DAILY, utc("2024-01-01 02:05"), now) == utc("2024-01-02 02:00")
    assert next_due(DAILY, datetime(2024, 1, 1, 2, 5), utc("2024-01-02 10:00")) == utc("2024-01-02 02:00")  # naive


def test_stagger_is_deterministic_and_spread():
    vms = [f"vm{i}" for i in range(200)]
    delays = stagger(vms, 600)
    assert delays == stagger(list(reversed(vms)), 600)
    assert set(delays) == set(vms)
    assert all(0 <= d < 600 for d in delays.values())
    assert len({round(d) for d in delays.values()}) > 150          # not bunched together
    assert stagger(["web01"], 600)["web01"] == stagger(["web01", "db01"], 600)["web01"]
    assert stagger(vms, 0) == {vm: 0 for vm in vms}
    with pytest.raises(RpfsError):
        stagger(vms, -1)


def test_systemd_units():
    units = systemd_units("/usr/local/bin/rpfs", "/var/lib/rpfs")
    service, timer = units["rpfs.service"], units["rpfs.timer"]
    assert set(units) == {"rpfs.service", "rpfs.timer"}
    assert "Type=oneshot\n" in service
    assert "WorkingDirectory=/\n" in service   # nothing of the folder `rpfs schedule` ran in
    assert "ExecStart=/usr/local/bin/rpfs --store /var/lib/rpfs run\n" in service
    assert "OnCalendar=*:0/15\n" in timer
    assert "Persistent=true\n" in timer and "RandomizedDelaySec=60\n" in timer
    assert "WantedBy=timers.target\n" in timer


def test_systemd_units_quote_what_systemd_would_expand_or_split():
    units = systemd_units("/usr/bin/python3 -m rpfs", "/srv/my backups/100%", interval="hourly")
    assert 'ExecStart=/usr/bin/python3 -m rpfs --store "/srv/my backups/100%%" run\n' in units["rpfs.service"]
    assert "OnCalendar=hourly\n" in units["rpfs.timer"]
    for bad in ({"store": "/a\nExecStartPre=/bin/sh"}, {"interval": ""}, {"rpfs_command": "'unclosed"}):
        with pytest.raises(RpfsError):
            systemd_units(**{"rpfs_command": "rpfs", "store": "/s", **bad})
