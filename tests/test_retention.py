"""Grandfather-father-son retention: which recovery points survive a prune, and why."""
from datetime import date, datetime, timedelta, timezone

from rpfs.policy.policies import Retention
from rpfs.policy.retention import select_kept


def at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=timezone.utc)


def year_of_daily_points(pinned: frozenset[date] = frozenset()) -> list[tuple[str, datetime, bool]]:
    """One point a day at noon through 2023 (which ends on a Sunday, the last day of ISO week 52)."""
    days = [date(2023, 1, 1) + timedelta(days=n) for n in range(365)]
    return [(day.isoformat(), at(day), day in pinned) for day in days]


def test_a_year_daily_weekly_monthly():
    kept, reasons = select_kept(year_of_daily_points(), Retention(daily=7, weekly=4, monthly=12))
    daily = {f"2023-12-{d}" for d in range(25, 32)}
    weekly = {"2023-12-31", "2023-12-24", "2023-12-17", "2023-12-10"}        # Sundays: the newest of each week
    monthly = {"2023-01-31", "2023-02-28", "2023-03-31", "2023-04-30", "2023-05-31", "2023-06-30",
               "2023-07-31", "2023-08-31", "2023-09-30", "2023-10-31", "2023-11-30", "2023-12-31"}  # month ends
    assert kept == daily | weekly | monthly
    assert len(kept) == 7 + 3 + 11                                          # 2023-12-24/31 are counted once
    assert sum("daily" in r for r in reasons.values()) == 7
    assert sum("weekly" in r for r in reasons.values()) == 4
    assert sum("monthly" in r for r in reasons.values()) == 12
    assert reasons["2023-12-31"] == "daily, weekly, monthly"
    assert reasons["2023-12-17"] == "weekly"
    assert reasons["2023-06-30"] == "monthly"
    assert set(reasons) == kept


def test_keep_last_and_yearly():
    kept, reasons = select_kept(year_of_daily_points(), Retention(keep_last=3, yearly=5))
    assert kept == {"2023-12-29", "2023-12-30", "2023-12-31"}               # one year of points: one yearly
    assert reasons["2023-12-31"] == "last 3, yearly"
    assert reasons["2023-12-29"] == "last 3"


def test_periods_count_only_days_that_have_points():
    points = [("a", at(date(2024, 1, 1)), False), ("b", at(date(2024, 1, 20)), False),
              ("c", at(date(2024, 3, 5)), False), ("d", at(date(2024, 3, 6)), False)]
    kept, _ = select_kept(points, Retention(daily=3))
    assert kept == {"b", "c", "d"}
    kept, _ = select_kept(points, Retention(monthly=2))
    assert kept == {"b", "d"}                                                # newest of January and of March


def test_newest_point_of_each_day_is_the_one_kept():
    day = date(2024, 5, 1)
    points = [(f"h{h}", at(day, h), False) for h in (1, 13, 7)] + [("prev", at(day - timedelta(days=1)), False)]
    kept, reasons = select_kept(points, Retention(daily=2))
    assert kept == {"h13", "prev"} and reasons == {"h13": "daily", "prev": "daily"}


def test_days_are_utc_days():
    minus5 = timezone(timedelta(hours=-5))
    late = datetime(2024, 5, 1, 21, 0, tzinfo=minus5)                         # 2024-05-02 02:00 UTC
    earlier = datetime(2024, 5, 2, 1, 0, tzinfo=timezone.utc)
    kept, _ = select_kept([("late", late, False), ("earlier", earlier, False)], Retention(daily=1))
    assert kept == {"late"}                                                  # same UTC day, and newer


def test_pinned_points_are_always_kept():
    pinned = frozenset({date(2023, 3, 15), date(2023, 12, 30)})
    kept, reasons = select_kept(year_of_daily_points(pinned), Retention(keep_last=1))
    assert kept == {"2023-12-31", "2023-03-15", "2023-12-30"}
    assert reasons["2023-03-15"] == "pinned"
    assert reasons["2023-12-31"] == "last 1"


def test_newest_is_kept_even_when_nothing_else_is():
    kept, reasons = select_kept(year_of_daily_points(), Retention())
    assert kept == {"2023-12-31"} and reasons == {"2023-12-31": "newest"}
    points = year_of_daily_points(frozenset({date(2023, 1, 1)}))
    kept, reasons = select_kept(points, Retention())
    assert kept == {"2023-01-01", "2023-12-31"} and reasons["2023-12-31"] == "newest"
    assert select_kept([], Retention(daily=7)) == (set(), {})


def test_input_order_does_not_matter():
    points = year_of_daily_points()
    retention = Retention(keep_last=2, daily=10, weekly=6, monthly=4, yearly=1)
    assert select_kept(points, retention) == select_kept(list(reversed(points)), retention)
