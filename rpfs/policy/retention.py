"""Which recovery points a retention keeps: grandfather-father-son, as restic's `forget --keep-*`.

Each rule works on its own over all points, newest first: keep_last keeps the newest N; daily keeps the
newest point of each of the last N UTC days that have points; weekly the same per ISO week, monthly per
year-month, yearly per year. A point kept by any rule is kept, so the rules overlap (today's point may
count as daily, weekly and monthly at once). Pinned points are always kept, and so is the newest point:
a retention never prunes everything. Everything else may be pruned.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

from rpfs.policy.policies import Retention

# rule -> the period a point falls in
PERIODS: dict[str, Callable[[datetime], tuple]] = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def select_kept(points: list[tuple[str, datetime, bool]],
                retention: Retention) -> tuple[set[str], dict[str, str]]:
    """(ids to keep, why each is kept) for points given as (id, time, pinned)."""
    newest_first = sorted(((_utc(time), point_id, pinned) for point_id, time, pinned in points), reverse=True)
    reasons: dict[str, list[str]] = {}

    def keep(point_id: str, reason: str) -> None:
        reasons.setdefault(point_id, [])
        if reason not in reasons[point_id]:
            reasons[point_id].append(reason)

    for _, point_id, pinned in newest_first:
        if pinned:
            keep(point_id, "pinned")
    for _, point_id, _ in newest_first[:max(retention.keep_last, 0)]:
        keep(point_id, f"last {retention.keep_last}")
    for rule, period_of in PERIODS.items():
        wanted = getattr(retention, rule)
        seen: set[tuple] = set()
        for time, point_id, _ in newest_first:
            if len(seen) >= wanted:
                break
            period = period_of(time)
            if period not in seen:          # newest first: the first point met is its period's newest
                seen.add(period)
                keep(point_id, rule)
    if newest_first and newest_first[0][1] not in reasons:
        keep(newest_first[0][1], "newest")
    return set(reasons), {point_id: ", ".join(why) for point_id, why in reasons.items()}


def _utc(moment: datetime) -> datetime:
    """Periods are UTC days, weeks, months and years; naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)
