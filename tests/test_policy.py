"""Policy files: good ones parse, bad ones are refused with the line of the mistake."""
import json
import re

import pytest

from rpfs.errors import RpfsError
from rpfs.policy.policies import (
    Policy,
    Retention,
    Schedule,
    check_name,
    policy_from_dict,
    policy_from_toml,
    policy_to_dict,
)

FULL = """\
name = "daily-30"
[schedule]
daily = "02:00"
[retention]
keep_last = 7
daily = 30
weekly = 8
monthly = 12
yearly = 3
[snapshot]
keep_days = 2
[consistency]
config = "/etc/rpfs/web01.toml"
[options]
allow_live = false
"""


def refused(text: str) -> tuple[int, str]:
    """The (line, reason) of the error a policy file is refused with."""
    with pytest.raises(RpfsError) as caught:
        policy_from_toml(text, "p.toml")
    message = caught.value.message
    assert "\n" not in message
    match = re.match(r"^p\.toml:(\d+): (.+)$", message)
    assert match, message
    return int(match.group(1)), match.group(2)


def test_full_policy():
    assert policy_from_toml(FULL, "p.toml") == Policy(
        name="daily-30", schedule=Schedule(kind="daily", at="02:00"),
        retention=Retention(keep_last=7, daily=30, weekly=8, monthly=12, yearly=3),
        keep_snapshot_days=2, consistency_config="/etc/rpfs/web01.toml", options={"allow_live": False})


def test_weekly_and_hourly_and_minimal():
    weekly = policy_from_toml('name = "w"\n[schedule]\nweekdays = ["thu", "Mon"]\nat = "3:30"\n'
                              '[retention]\nweekly = 4\n', "p.toml")
    assert weekly.schedule == Schedule(kind="weekly", at="03:30", weekdays=["mon", "thu"])
    assert weekly.keep_snapshot_days == 0 and weekly.consistency_config is None and weekly.options == {}
    hourly = policy_from_toml('name = "h"\n[schedule]\nevery_hours = 6\n[retention]\nkeep_last = 1\n', "p.toml")
    assert hourly.schedule.kind == "hourly" and hourly.schedule.every_hours == 6
    default_at = policy_from_toml('name = "w"\n[schedule]\nweekdays = ["sun"]\n[retention]\nweekly = 4\n', "p")
    assert default_at.schedule.at == "02:00"


def test_keys_written_inline_or_dotted():
    p = policy_from_toml('name = "x"\nschedule = { every_hours = 24 }\nretention.daily = 3\n', "p.toml")
    assert p.schedule.every_hours == 24 and p.retention.daily == 3


def with_line(line_no: int, new: str) -> str:
    """FULL with one line replaced (1-based), so the expected line number is obvious."""
    lines = FULL.splitlines()
    lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("line_no, new, reason", [
    (3, 'daily = "25:00"', "daily must be a time"),
    (3, 'daily = "02:60"', "daily must be a time"),
    (3, 'daily = 2', "daily must be a time"),
    (3, 'weekdays = ["mon", "funday"]', "'funday' is not a weekday"),
    (3, 'weekdays = []', "weekdays must be a list"),
    (3, 'every_hours = 0', "every_hours must be a whole number from 1 to 24"),
    (3, 'every_hours = 25', "every_hours must be a whole number from 1 to 24"),
    (3, 'every_hours = "6"', "every_hours must be a whole number"),
    (3, 'at = "03:00"', "at needs weekdays"),
    (3, 'dayly = "02:00"', "unknown key 'dayly' in [schedule]"),
    (6, 'daily = -1', "daily must be a whole number, 0 or more"),
    (6, 'daily = 3.5', "daily must be a whole number"),
    (7, 'weekly = true', "weekly must be a whole number"),
    (8, 'montly = 12', "unknown key 'montly' in [retention]"),
    (11, 'keep_days = -2', "keep_days must be a number of days"),
    (13, 'config = "web01.toml"', "config must be an absolute path"),
    (15, 'allow_live = "no"', "allow_live must be true or false"),
    (15, 'compress = true', "unknown key 'compress' in [options]"),
    (14, '[optoins]', "unknown section [optoins]"),
    (1, 'name = "has space"', "invalid policy name"),
    (1, 'name = 7', "invalid policy name"),
    (1, 'nmae = "x"', "unknown key 'nmae'"),
])
def test_bad_value_refused_at_its_line(line_no, new, reason):
    line, message = refused(with_line(line_no, new))
    assert (line, message[:len(reason)]) == (line_no, reason), message


def test_two_schedule_kinds_point_at_the_second():
    text = 'name = "x"\n[schedule]\ndaily = "02:00"\n\nevery_hours = 6\n[retention]\ndaily = 1\n'
    assert refused(text) == (5, "[schedule] sets both daily and every_hours: choose one")


def test_at_without_weekdays():
    text = 'name = "x"\n[schedule]\nat = "01:00"\ndaily = "02:00"\n[retention]\ndaily = 1\n'
    line, reason = refused(text)
    assert line == 3 and reason.startswith("at goes with weekdays")


def test_retention_that_keeps_nothing_points_at_its_section():
    text = 'name = "x"\n[schedule]\ndaily = "02:00"\n\n[retention]\nkeep_last = 0\ndaily = 0\n'
    line, reason = refused(text)
    assert line == 5 and reason.startswith("the retention keeps nothing")
    line, reason = refused('name = "x"\n[schedule]\ndaily = "02:00"\n')   # no [retention] at all
    assert line == 1 and reason.startswith("the retention keeps nothing")


def test_missing_parts():
    assert refused('[schedule]\ndaily = "02:00"\n[retention]\ndaily = 1\n')[0] == 1          # no name
    line, reason = refused('name = "x"\n[retention]\ndaily = 1\n')
    assert line == 1 and reason.startswith("no schedule")
    line, reason = refused('name = "x"\n[schedule]\n[retention]\ndaily = 1\n')
    assert line == 2 and reason.startswith("no schedule")


def test_section_given_as_a_value():
    line, reason = refused('name = "x"\nschedule = "daily"\n[retention]\ndaily = 1\n')
    assert line == 2 and reason.startswith("schedule must be a section [schedule]")


def test_earliest_unknown_key_is_reported():
    text = FULL.replace("[options]", "[extra]").replace("keep_last", "keep_lats")
    assert refused(text) == (5, "unknown key 'keep_lats' in [retention] (known: keep_last, daily, weekly, "
                                "monthly, yearly)")


def test_unknown_section_written_as_a_subtable():
    line, reason = refused('name = "x"\n[schedule]\ndaily = "02:00"\n[retention]\ndaily = 1\n\n[foo.bar]\n')
    assert line == 7 and reason.startswith("unknown section [foo]")


def test_toml_syntax_error_has_its_line():
    line, reason = refused('name = "x"\n[schedule]\ndaily = 02:00:00:00\n')
    assert line == 3 and reason.startswith("not valid TOML")


def test_multiline_strings_are_not_mistaken_for_keys():
    text = ('name = "x"\n[consistency]\nconfig = """/etc/rpfs/x.toml\n[schedule]\ndaily = "25:00"\n"""\n'
            '[schedule]\ndaily = "25:00"\n[retention]\ndaily = 1\n')
    assert refused(text)[0] == 8


def test_dict_round_trip_through_json():
    policy = policy_from_toml(FULL, "p.toml")
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(policy)))) == policy
    weekly = Policy(name="w", schedule=Schedule(kind="weekly", at="03:30", weekdays=["mon", "thu"]),
                    retention=Retention(weekly=4))
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(weekly)))) == weekly


def test_bad_stored_policy_refused():
    stored = policy_to_dict(policy_from_toml(FULL, "p.toml"))
    stored["schedule"]["at"] = "24:00"
    with pytest.raises(RpfsError, match=r"^policy 'daily-30': schedule\.at: at must be a time"):
        policy_from_dict(stored)
    stored = policy_to_dict(policy_from_toml(FULL, "p.toml"))
    stored["retention"] = {"keep_last": 0}
    with pytest.raises(RpfsError, match="retention keeps nothing"):
        policy_from_dict(stored)


def test_check_name():
    assert check_name("daily-30_v1.2+x") == "daily-30_v1.2+x"
    for bad in ("", "-x", "a/b", "a b", "ü"):
        with pytest.raises(RpfsError, match="invalid policy name"):
            check_name(bad)


def test_vault_section_round_trips_and_is_checked():
    text = FULL + '[vault]\nname = "offsite"\ndaily = 30\nmonthly = 12\n'
    policy = policy_from_toml(text, "p.toml")
    assert policy.vault == "offsite" and policy.vault_retention == Retention(daily=30, monthly=12)
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(policy)))) == policy
    assert policy_from_toml(FULL + '[vault]\nname = "offsite"\n', "p.toml").vault_retention is None   # keeps all
    assert refused(FULL + '[vault]\ndaily = 3\n') == (16, '[vault] needs name = "..." (a vault of rpfs vault add)')
    assert refused(FULL + '[vault]\nname = "offsite"\nhourly = 3\n')[0] == 18
