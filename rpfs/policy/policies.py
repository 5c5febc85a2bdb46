"""A protection policy: when a VM is backed up, which recovery points are kept, how it is quiesced.

People write policies by hand in TOML, so a bad file is refused with the line of the mistake:

    name = "daily-30"
    [schedule]
    daily = "02:00"             # or: weekdays = ["mon", "thu"] and at = "03:30"; or: every_hours = 6
    [retention]
    keep_last = 7               # and daily, weekly, monthly, yearly (see policy/retention.py)
    [snapshot]
    keep_days = 2               # keep the newest reflink snapshot this long (instant restore)
    [consistency]
    config = "/etc/rpfs/web01.toml"   # pre/post scripts and freeze (backup/quiesce.py)
    [options]
    allow_live = false
    require_consistency = "file-system"   # a libvirt domain: no point unless at least this (or "application")
    catalog = true              # catalog the files inside each new point (rpfs find); the default
    [vault]
    name = "offsite"            # push each new point to this vault (rpfs vault add)
    daily = 30                  # what the vault keeps (as [retention]); none: it keeps every point
    monthly = 12

The store keeps policies as JSON (policy_to_dict); policy_from_dict checks them again on the way in.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field

from rpfs.errors import RpfsError
from rpfs.store.recovery_point import NAME_RE

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")   # index = datetime.weekday()
SCHEDULE_KINDS = ("daily", "weekly", "hourly")
RETENTION_RULES = ("keep_last", "daily", "weekly", "monthly", "yearly")
OPTION_TYPES: dict[str, type] = {"allow_live": bool, "require_consistency": str, "catalog": bool}
REQUIRABLE = ("file-system", "application")   # require_consistency: a libvirt domain's point at least this

# The TOML layout: section -> its keys ("" is the top level).
TOML_KEYS: dict[str, tuple[str, ...]] = {
    "": ("name",),
    "schedule": ("daily", "weekdays", "at", "every_hours"),
    "retention": RETENTION_RULES,
    "snapshot": ("keep_days",),
    "consistency": ("config",),
    "options": tuple(OPTION_TYPES),
    "vault": ("name",) + RETENTION_RULES,
}
TOML_SCHEDULE_KINDS = {"daily": "daily", "weekdays": "weekly", "every_hours": "hourly"}   # key -> kind

HHMM_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})")   # fullmatch


@dataclass
class Schedule:
    """Exactly one of: every day at a time, chosen weekdays at a time, every N hours. Times are UTC."""
    kind: str                                           # "daily" | "weekly" | "hourly"
    at: str = "02:00"                                   # HH:MM, for daily and weekly
    weekdays: list[str] = field(default_factory=list)   # weekly: some of mon..sun, in week order
    every_hours: int = 0                                # hourly: 1..24


@dataclass
class Retention:
    """Grandfather-father-son counts: each rule keeps the newest point of its last N periods with points."""
    keep_last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0


@dataclass
class Policy:
    name: str
    schedule: Schedule
    retention: Retention
    keep_snapshot_days: float = 0           # keep the newest reflink snapshot this long; 0: delete it at once
    consistency_config: str | None = None   # path of a quiesce TOML (pre/post scripts, freeze)
    options: dict = field(default_factory=dict)   # backup options; the known keys are OPTION_TYPES
    vault: str | None = None                # push each new recovery point to this vault
    vault_retention: Retention | None = None   # what the vault keeps; None: every point


class _Problem(Exception):
    """A bad value and the key path it was found at; the caller turns the path into a line number."""

    def __init__(self, reason: str, path: tuple[str, ...] = ()):
        super().__init__(reason)
        self.reason = reason
        self.path = path


def check_name(name: str) -> str:
    """Policy names share the VM-name alphabet: they appear in listings, paths and unit names."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RpfsError(f"invalid policy name {name!r}: use letters, digits, '.', '_', '+', '-'"
                        " (not starting with a symbol)")
    return name


# --- TOML -------------------------------------------------------------------------------------------

def policy_from_toml(text: str, source: str) -> Policy:
    """Parse a policy file; any mistake is refused as "{source}:{line}: {reason}"."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        where = re.search(r"\s*\(at line (\d+), column \d+\)$", message)
        if where:
            raise RpfsError(f"{source}:{where.group(1)}: not valid TOML: {message[:where.start()]}") from None
        raise RpfsError(f"{source}:1: not valid TOML: {message}") from None
    lines = _key_lines(text)
    try:
        return _policy_from_tables(raw, lines)
    except _Problem as problem:
        raise RpfsError(f"{source}:{_line_of(lines, problem.path)}: {problem.reason}") from None


def _policy_from_tables(raw: dict, lines: dict[tuple[str, ...], int]) -> Policy:
    _check_layout(raw, lines)
    if "name" not in raw:
        raise _Problem("no policy name: add name = \"...\" at the top")
    name = _name(raw["name"], ("name",))
    schedule = _schedule_from_toml(raw.get("schedule"), lines)
    retention = _retention(raw.get("retention", {}), ("retention",))
    keep_days = raw.get("snapshot", {}).get("keep_days", 0)
    config = raw.get("consistency", {}).get("config")
    vault, vault_retention = _vault(raw.get("vault"), ("vault",))
    return Policy(name=name, schedule=schedule, retention=retention,
                  keep_snapshot_days=_keep_days(keep_days, ("snapshot", "keep_days")),
                  consistency_config=None if config is None else _config_path(config, ("consistency", "config")),
                  options=_options(raw.get("options", {}), ("options",)), vault=vault, vault_retention=vault_retention)


def _vault(table: dict | None, path: tuple[str, ...]) -> tuple[str | None, Retention | None]:
    """[vault]: its name and, if any rule is given, what it keeps."""
    if table is None:
        return None, None
    if "name" not in table:
        raise _Problem("[vault] needs name = \"...\" (a vault of rpfs vault add)", path)
    rules = {k: v for k, v in table.items() if k != "name"}
    return _name(table["name"], path + ("name",)), _retention(rules, path) if rules else None


def _check_layout(raw: dict, lines: dict[tuple[str, ...], int]) -> None:
    """Unknown sections and keys first, the earliest in the file first: usually a typo."""
    problems = []
    for key, value in raw.items():
        if key in TOML_KEYS[""]:
            continue
        if key not in TOML_KEYS or not key:
            what = f"section [{key}]" if isinstance(value, dict) else f"key {key!r}"
            problems.append(_Problem(f"unknown {what} (known sections: "
                                     f"{', '.join(s for s in TOML_KEYS if s)}; top-level keys: name)", (key,)))
        elif not isinstance(value, dict):
            problems.append(_Problem(f"{key} must be a section [{key}], not {_describe(value)}", (key,)))
        else:
            known = TOML_KEYS[key]
            for unknown in (k for k in value if k not in known):
                problems.append(_Problem(f"unknown key {unknown!r} in [{key}] (known: {', '.join(known)})",
                                         (key, unknown)))
    if problems:
        raise min(problems, key=lambda p: _line_of(lines, p.path))


def _schedule_from_toml(table: dict | None, lines: dict[tuple[str, ...], int]) -> Schedule:
    if not table:
        raise _Problem("no schedule: add a [schedule] section with one of daily = \"HH:MM\", "
                       "weekdays = [...] (with at = \"HH:MM\"), every_hours = N", ("schedule",))
    given = sorted((k for k in TOML_SCHEDULE_KINDS if k in table), key=lambda k: _line_of(lines, ("schedule", k)))
    if not given:    # [schedule] holds only `at` (the layout check refused anything else)
        raise _Problem("at needs weekdays = [...] beside it (or use daily = \"HH:MM\")", ("schedule", "at"))
    if len(given) > 1:
        raise _Problem(f"[schedule] sets both {given[0]} and {given[1]}: choose one", ("schedule", given[1]))
    kind = TOML_SCHEDULE_KINDS[given[0]]
    if "at" in table and kind != "weekly":
        raise _Problem(f"at goes with weekdays; {given[0]} " +
                       ("takes its own time (daily = \"HH:MM\")" if kind == "daily" else "takes no time of day"),
                       ("schedule", "at"))
    if kind == "daily":
        return Schedule(kind="daily", at=_hhmm(table["daily"], ("schedule", "daily")))
    if kind == "weekly":
        return Schedule(kind="weekly", at=_hhmm(table.get("at", "02:00"), ("schedule", "at")),
                        weekdays=_weekdays(table["weekdays"], ("schedule", "weekdays")))
    return Schedule(kind="hourly", every_hours=_every_hours(table["every_hours"], ("schedule", "every_hours")))


# --- JSON -------------------------------------------------------------------------------------------

def policy_to_dict(policy: Policy) -> dict:
    return asdict(policy)


def policy_from_dict(d: dict) -> Policy:
    """Rebuild a policy from JSON (the store, or CLI flags), checked like a file: nothing bad slips in."""
    try:
        return _policy_from_dict(d)
    except _Problem as problem:
        name = d.get("name") if isinstance(d, dict) else None
        where = ".".join(problem.path)
        raise RpfsError(f"policy {name!r}: {where + ': ' if where else ''}{problem.reason}") from None


def _policy_from_dict(d: dict) -> Policy:
    if not isinstance(d, dict):
        raise _Problem(f"a policy must be an object, not {_describe(d)}")
    known = ("name", "schedule", "retention", "keep_snapshot_days", "consistency_config", "options", "vault",
             "vault_retention")
    for key in d:
        if key not in known:
            raise _Problem(f"unknown field {key!r}", (key,))
    for key in ("name", "schedule", "retention"):
        if key not in d:
            raise _Problem(f"missing field {key!r}")
    schedule = d["schedule"]
    if not isinstance(schedule, dict):
        raise _Problem(f"must be an object, not {_describe(schedule)}", ("schedule",))
    for key in schedule:
        if key not in ("kind", "at", "weekdays", "every_hours"):
            raise _Problem(f"unknown field {key!r}", ("schedule", key))
    kind = schedule.get("kind")
    if kind not in SCHEDULE_KINDS:
        raise _Problem(f"kind must be one of {', '.join(SCHEDULE_KINDS)}, not {kind!r}", ("schedule", "kind"))
    if kind == "hourly":
        parsed = Schedule(kind=kind, every_hours=_every_hours(schedule.get("every_hours"), ("schedule", "every_hours")))
    else:
        parsed = Schedule(kind=kind, at=_hhmm(schedule.get("at", "02:00"), ("schedule", "at")))
        if kind == "weekly":
            parsed.weekdays = _weekdays(schedule.get("weekdays"), ("schedule", "weekdays"))
    config = d.get("consistency_config")
    vault, vault_retention = d.get("vault"), d.get("vault_retention")
    if vault_retention is not None and vault is None:
        raise _Problem("a vault retention without a vault", ("vault_retention",))
    return Policy(name=_name(d["name"], ("name",)), schedule=parsed, retention=_retention(d["retention"], ("retention",)),
                  keep_snapshot_days=_keep_days(d.get("keep_snapshot_days", 0), ("keep_snapshot_days",)),
                  consistency_config=None if config is None else _config_path(config, ("consistency_config",)),
                  options=_options(d.get("options", {}), ("options",)),
                  vault=None if vault is None else _name(vault, ("vault",)),
                  vault_retention=None if vault_retention is None else _retention(vault_retention, ("vault_retention",)))


# --- values, shared by both readers ----------------------------------------------------------------

def _name(value: object, path: tuple[str, ...]) -> str:
    try:
        return check_name(value)
    except RpfsError as e:
        raise _Problem(e.message, path) from None


def _hhmm(value: object, path: tuple[str, ...]) -> str:
    match = HHMM_RE.fullmatch(value) if isinstance(value, str) else None
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        raise _Problem(f"{path[-1]} must be a time \"HH:MM\" from 00:00 to 23:59 (UTC), not {_describe(value)}", path)
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def _weekdays(value: object, path: tuple[str, ...]) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _Problem(f"weekdays must be a list of some of {', '.join(WEEKDAYS)}, not {_describe(value)}", path)
    for day in value:
        if not isinstance(day, str) or day.lower() not in WEEKDAYS:
            raise _Problem(f"{_describe(day)} is not a weekday (use {', '.join(WEEKDAYS)})", path)
    chosen = {day.lower() for day in value}
    return [day for day in WEEKDAYS if day in chosen]


def _every_hours(value: object, path: tuple[str, ...]) -> int:
    if not _is_int(value) or not 1 <= value <= 24:
        raise _Problem(f"every_hours must be a whole number from 1 to 24, not {_describe(value)}", path)
    return value


def _retention(table: object, path: tuple[str, ...]) -> Retention:
    if not isinstance(table, dict):
        raise _Problem(f"retention must be a table, not {_describe(table)}", path)
    for key in table:
        if key not in RETENTION_RULES:
            raise _Problem(f"unknown key {key!r} in retention (known: {', '.join(RETENTION_RULES)})", path + (key,))
    for key, value in table.items():
        if not _is_int(value) or value < 0:
            raise _Problem(f"{key} must be a whole number, 0 or more, not {_describe(value)}", path + (key,))
    retention = Retention(**table)
    if not any(asdict(retention).values()):
        raise _Problem(f"the retention keeps nothing: set at least one of {', '.join(RETENTION_RULES)} above 0", path)
    return retention


def _keep_days(value: object, path: tuple[str, ...]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 36500:
        raise _Problem(f"{path[-1]} must be a number of days, from 0 to 36500, not {_describe(value)}", path)
    return value


def _config_path(value: object, path: tuple[str, ...]) -> str:
    """Absolute only: scheduled backups run from / under systemd, where a relative path means nothing."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Problem(f"{path[-1]} must be an absolute path, not {_describe(value)}", path)
    return value


def _options(table: object, path: tuple[str, ...]) -> dict:
    if not isinstance(table, dict):
        raise _Problem(f"options must be a table, not {_describe(table)}", path)
    for key, value in table.items():
        if key not in OPTION_TYPES:
            raise _Problem(f"unknown option {key!r} (known: {', '.join(OPTION_TYPES)})", path + (key,))
        if OPTION_TYPES[key] is bool and not isinstance(value, bool):
            raise _Problem(f"{key} must be true or false, not {_describe(value)}", path + (key,))
        if key == "require_consistency" and value not in REQUIRABLE:
            raise _Problem(f"{key} must be one of {', '.join(REQUIRABLE)}, not {_describe(value)}", path + (key,))
    return dict(table)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, (str, int, float)):
        return repr(value)
    return {list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# --- line numbers -----------------------------------------------------------------------------------
# tomllib reports no positions for keys, so find them by scanning the text: a `[table]` header sets the
# current table, a `key =` line (bare, quoted or dotted key) names a key in it. Good enough for messages.

_KEY_PART = r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'"""
_DOTTED = rf"(?:{_KEY_PART})(?:\s*\.\s*(?:{_KEY_PART}))*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(rf"^\s*({_DOTTED})\s*=")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table and key path to the first line (1-based) that defines it."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_string = None          # inside a multi-line string, whose lines are not keys
    for number, line in enumerate(text.splitlines(), 1):
        if open_string:
            if open_string in line:
                open_string = None
            continue
        header = _HEADER_RE.match(line)
        if header:
            table = _key_parts(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY_RE.match(line)
        if key:
            lines.setdefault(table + _key_parts(key.group(1)), number)
            rest = line[key.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2:
                    open_string = quote
    return lines


def _key_parts(dotted: str) -> tuple[str, ...]:
    return tuple(part[1:-1] if part[0] in "\"'" else part for part in re.findall(_KEY_PART, dotted))


def _line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int:
    """The line of a key, else of the first key under it ([a.b] defines a), else of the nearest
    enclosing table that has one, else line 1."""
    if path and path not in lines:
        inside = [line for key, line in lines.items() if key[:len(path)] == path]
        if inside:
            return min(inside)
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1
