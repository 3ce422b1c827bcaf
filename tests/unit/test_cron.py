"""Timetables (``conveyor.cron``): when runs fall due, and what a late scheduler fires.

Every moment here is fixed; no test reads the clock or sleeps.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

import conveyor.cron
from conveyor.cron import CatchUp, InvalidTimetable, Plan, Timetable, plan

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"
US = timedelta(microseconds=1)
HOUR = timedelta(hours=1)

# 2026's DST changes (checked against zoneinfo in test_the_dst_dates_used_here_are_right).
BERLIN_SPRING = date(2026, 3, 29)  # 02:00 CET -> 03:00 CEST
BERLIN_FALL = date(2026, 10, 25)  # 03:00 CEST -> 02:00 CET: 02:00-03:00 twice
NEW_YORK_SPRING = date(2026, 3, 8)  # 02:00 EST -> 03:00 EDT
NEW_YORK_FALL = date(2026, 11, 1)  # 02:00 EDT -> 01:00 EST: 01:00-02:00 twice
PLAIN_DAY = date(2026, 6, 1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def local(zone: str, day: date, hour: int = 0, minute: int = 0, *, fold: int = 0) -> datetime:
    """A wall time of ``zone`` on ``day``, as an aware datetime."""
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(zone), fold=fold)


def day_bounds(zone: str, day: date) -> tuple[datetime, datetime]:
    """Local midnight of ``day`` and of the day after, in UTC."""
    return (
        local(zone, day).astimezone(UTC),
        local(zone, day + timedelta(days=1)).astimezone(UTC),
    )


def runs_between(timetable: Timetable, begin: datetime, end: datetime) -> list[datetime]:
    """Every run in [begin, end), found by stepping next_after."""
    found: list[datetime] = []
    run = timetable.next_after(begin - US)
    while run is not None and run < end:
        found.append(run)
        run = timetable.next_after(run)
    return found


def day_runs(timetable: Timetable, zone: str, day: date) -> list[datetime]:
    return runs_between(timetable, *day_bounds(zone, day))


def first_runs(timetable: Timetable, after: datetime, count: int) -> list[datetime]:
    found: list[datetime] = []
    moment: datetime | None = after
    for _ in range(count):
        assert moment is not None
        moment = timetable.next_after(moment)
        assert moment is not None
        found.append(moment)
    return found


def cron(
    expression: str, zone: str = "UTC", *, start: datetime | None = None, hash_id: str = ""
) -> Timetable:
    return Timetable(kind="cron", cron=expression, timezone=zone, start=start, hash_id=hash_id)


# --- DST: cron and daily runs in a time zone ------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        (BERLIN, BERLIN_SPRING, 23),
        (BERLIN, BERLIN_FALL, 25),
        (NEW_YORK, NEW_YORK_SPRING, 23),
        (NEW_YORK, NEW_YORK_FALL, 25),
        (BERLIN, PLAIN_DAY, 24),
        (NEW_YORK, PLAIN_DAY, 24),
    ],
)
def test_the_dst_dates_used_here_are_right(zone, day, hours):
    begin, end = day_bounds(zone, day)
    assert end - begin == timedelta(hours=hours)


# (zone, day, cron at a wall time that day skips or repeats)
GAPS = [
    (BERLIN, BERLIN_SPRING, "30 2 * * *"),
    (NEW_YORK, NEW_YORK_SPRING, "30 2 * * *"),
]
FOLDS = [
    (BERLIN, BERLIN_FALL, "30 2 * * *"),
    (NEW_YORK, NEW_YORK_FALL, "30 1 * * *"),
]


def assert_runs_once_after_the_gap(runs: list[datetime], zone: str, day: date) -> None:
    assert len(runs) == 1
    wall = runs[0].astimezone(ZoneInfo(zone))
    # The wall time does not exist: the run moves past the gap (03:00 is its end), same day.
    assert wall.date() == day
    assert local(zone, day, 3) <= wall < local(zone, day, 4)


def assert_runs_once_at_the_first(runs: list[datetime], zone: str, day: date, hour: int) -> None:
    # Two moments have that wall time; only the first (still summer time) runs.
    assert runs == [local(zone, day, hour, 30, fold=0).astimezone(UTC)]
    second = local(zone, day, hour, 30, fold=1).astimezone(UTC)
    assert runs[0] == second - HOUR  # not the second one


@pytest.mark.parametrize(("zone", "day", "expression"), GAPS)
def test_a_cron_at_a_wall_time_in_the_spring_gap_runs_once_just_after_it(zone, day, expression):
    timetable = cron(expression, zone)
    assert_runs_once_after_the_gap(day_runs(timetable, zone, day), zone, day)


@pytest.mark.parametrize(("zone", "day", "expression"), FOLDS)
def test_a_cron_at_a_repeated_wall_time_runs_once_not_twice(zone, day, expression):
    timetable = cron(expression, zone)
    hour = int(expression.split()[1])
    assert_runs_once_at_the_first(day_runs(timetable, zone, day), zone, day, hour)


@pytest.mark.parametrize(("zone", "day", "expression"), GAPS + FOLDS)
def test_a_fixed_hour_cron_runs_once_every_day_around_a_dst_change(zone, day, expression):
    timetable = cron(expression, zone)
    minute, hour = (int(field) for field in expression.split()[:2])
    for offset in range(-3, 4):
        runs = day_runs(timetable, zone, day + timedelta(days=offset))
        assert len(runs) == 1, day + timedelta(days=offset)
        if offset:  # an ordinary day: at its wall time exactly
            assert runs[0] == local(zone, day + timedelta(days=offset), hour, minute)


@pytest.mark.parametrize(
    ("zone", "day", "expected"),
    [
        (BERLIN, BERLIN_SPRING, 23),
        (BERLIN, BERLIN_FALL, 25),
        (BERLIN, PLAIN_DAY, 24),
        (NEW_YORK, NEW_YORK_SPRING, 23),
        (NEW_YORK, NEW_YORK_FALL, 25),
        (NEW_YORK, PLAIN_DAY, 24),
    ],
)
@pytest.mark.parametrize("expression", ["0 * * * *", "@hourly", "0 */1 * * *"])
def test_an_hourly_cron_runs_in_every_real_hour(zone, day, expected, expression):
    runs = day_runs(cron(expression, zone), zone, day)
    assert len(runs) == expected
    begin, _ = day_bounds(zone, day)
    # One an hour apart, from local midnight: both repeated hours, and none in the gap.
    assert runs == [begin + HOUR * index for index in range(expected)]


@pytest.mark.parametrize(
    ("zone", "day", "expected"),
    [(BERLIN, BERLIN_SPRING, 46), (BERLIN, BERLIN_FALL, 50), (NEW_YORK, NEW_YORK_FALL, 50)],
)
def test_a_cron_every_half_hour_runs_in_both_repeated_hours(zone, day, expected):
    runs = day_runs(cron("0,30 * * * *", zone), zone, day)
    assert len(runs) == expected
    assert all(later - earlier == timedelta(minutes=30) for earlier, later in pairwise(runs))


def daily(zone: str, hour: int, minute: int, start_day: date = date(2026, 1, 5)) -> Timetable:
    return Timetable(kind="daily", start=local(zone, start_day, hour, minute), timezone=zone)


@pytest.mark.parametrize(("zone", "day", "expression"), GAPS)
def test_a_daily_run_at_a_wall_time_in_the_spring_gap_runs_once_just_after_it(
    zone, day, expression
):
    assert_runs_once_after_the_gap(day_runs(daily(zone, 2, 30), zone, day), zone, day)


@pytest.mark.parametrize(("zone", "day", "expression"), FOLDS)
def test_a_daily_run_at_a_repeated_wall_time_runs_once_not_twice(zone, day, expression):
    hour = int(expression.split()[1])
    runs = day_runs(daily(zone, hour, 30), zone, day)
    assert_runs_once_at_the_first(runs, zone, day, hour)


@pytest.mark.parametrize(("zone", "day", "expression"), GAPS + FOLDS)
def test_a_daily_timetable_runs_like_the_same_cron_across_a_dst_change(zone, day, expression):
    minute, hour = (int(field) for field in expression.split()[:2])
    begin, _ = day_bounds(zone, day - timedelta(days=5))
    _, end = day_bounds(zone, day + timedelta(days=5))
    by_cron = runs_between(cron(expression, zone), begin, end)
    by_kind = runs_between(daily(zone, hour, minute), begin, end)
    assert len(by_kind) == 11
    assert by_kind == by_cron


def test_a_weekly_timetable_keeps_its_wall_time_across_dst_changes():
    timetable = Timetable(kind="weekly", start=local(BERLIN, date(2026, 3, 16), 9), timezone=BERLIN)
    runs = first_runs(timetable, utc(2026, 3, 1), 4)
    assert [run.astimezone(ZoneInfo(BERLIN)).hour for run in runs] == [9, 9, 9, 9]
    assert [run.date() for run in runs] == [
        date(2026, 3, 16),
        date(2026, 3, 23),
        date(2026, 3, 30),
        date(2026, 4, 6),
    ]
    assert runs[2] - runs[1] == timedelta(days=7) - HOUR  # the week with the spring change


def test_a_biweekly_timetable_runs_every_fourteen_days_at_its_wall_time():
    timetable = Timetable(
        kind="biweekly", start=local(NEW_YORK, date(2026, 10, 19), 8), timezone=NEW_YORK
    )
    runs = first_runs(timetable, utc(2026, 10, 1), 3)
    assert runs == [
        local(NEW_YORK, date(2026, 10, 19), 8),
        local(NEW_YORK, date(2026, 11, 2), 8),
        local(NEW_YORK, date(2026, 11, 16), 8),
    ]


def test_moments_in_any_time_zone_give_the_same_runs():
    timetable = cron("30 2 * * *", BERLIN)
    moment = utc(2026, 10, 24, 12)
    in_new_york = moment.astimezone(ZoneInfo(NEW_YORK))
    assert timetable.next_after(in_new_york) == timetable.next_after(moment)
    assert timetable.last_until(in_new_york) == timetable.last_until(moment)
    assert timetable.next_after(moment).utcoffset() == timedelta(0)


# --- last_until agrees with next_after --------------------------------------------------------


def around(*centres: datetime, span_hours: int, count: int) -> list[datetime]:
    """``count`` uneven moments within ``span_hours`` either side of each centre."""
    span = 2 * span_hours * 3600
    moments = []
    for centre in centres:
        for index in range(count):
            # an irregular offset: some on whole seconds, some not
            seconds = (index * 7919 + 13) % span - span // 2
            moments.append(centre + timedelta(seconds=seconds, microseconds=(index % 3) * 250_000))
    return moments


DST_CHANGES = [utc(2026, 3, 29, 1), utc(2026, 10, 25, 1), utc(2026, 3, 8, 7), utc(2026, 11, 1, 6)]


def assert_consistent(timetable: Timetable, moment: datetime) -> None:
    following = timetable.next_after(moment)
    latest = timetable.last_until(moment)
    assert following is not None
    assert latest is not None
    assert following > moment >= latest
    assert timetable.last_until(following) == following
    after_latest = timetable.next_after(latest)
    assert after_latest is not None
    assert after_latest > moment
    # nothing runs between the two
    assert after_latest == following
    assert timetable.last_until(following - US) == latest


@pytest.mark.parametrize("zone", [BERLIN, NEW_YORK])
@pytest.mark.parametrize(
    ("expression", "hash_id"),
    [
        ("30 2 * * *", ""),
        ("30 1 * * *", ""),
        ("0 * * * *", ""),
        ("15,45 * * * *", ""),
        ("0 */2 * * *", ""),
        ("@hourly", ""),
        ("@daily", ""),
        ("H H * * *", "nightly-report"),
        ("H/15 * * * *", "sync-mirrors"),
    ],
)
def test_last_until_is_consistent_with_next_after(zone, expression, hash_id):
    timetable = cron(expression, zone, hash_id=hash_id)
    timetable.validate()
    for moment in around(*DST_CHANGES, span_hours=4, count=6):
        assert_consistent(timetable, moment)


def test_last_until_is_consistent_with_next_after_for_a_seconds_cron():
    timetable = cron("*/20 * * * * *", BERLIN)
    timetable.validate()
    # the spring change, and a moment in the first of the two repeated hours (slow calls)
    for moment in [
        utc(2026, 3, 29, 1),
        utc(2026, 10, 25, 1, 0, 50, 1),
        utc(2026, 10, 25, 0, 30, 7),
    ]:
        assert_consistent(timetable, moment)


@pytest.mark.parametrize(
    "timetable",
    [
        Timetable(kind="every", every=timedelta(seconds=7), start=utc(2026, 1, 1, 0, 0, 3)),
        Timetable(kind="hourly", start=utc(2026, 1, 1, 0, 15)),
        Timetable(kind="daily", start=local(BERLIN, date(2026, 1, 1), 2, 30), timezone=BERLIN),
        Timetable(kind="weekly", start=local(NEW_YORK, date(2026, 1, 1), 1, 30), timezone=NEW_YORK),
        Timetable(kind="monthly", start=local(BERLIN, date(2026, 1, 31), 2, 30), timezone=BERLIN),
        Timetable(kind="quarterly", start=utc(2025, 11, 30, 12)),
        Timetable(kind="yearly", start=utc(2024, 2, 29, 12)),
    ],
    ids=lambda timetable: timetable.kind,
)
def test_last_until_is_consistent_with_next_after_for_stepped_kinds(timetable):
    for moment in around(*DST_CHANGES, span_hours=30, count=10):
        assert_consistent(timetable, moment)


def test_a_moment_exactly_on_a_run():
    timetable = cron("0 * * * *", BERLIN)
    run = utc(2026, 10, 25, 1)  # the second 02:00 of the fall-back day
    assert timetable.last_until(run) == run
    assert timetable.next_after(run) == run + HOUR  # strictly after
    assert timetable.next_after(run - US) == run
    assert timetable.last_until(run - US) == run - HOUR


# --- seconds, aliases, H ----------------------------------------------------------------------


def test_a_six_field_cron_has_seconds_first():
    timetable = cron("30 0 * * * *")  # second 30 of minute 0 of every hour
    assert timetable.next_after(utc(2026, 5, 1, 12, 0, 0)) == utc(2026, 5, 1, 12, 0, 30)
    assert timetable.next_after(utc(2026, 5, 1, 12, 0, 30)) == utc(2026, 5, 1, 13, 0, 30)
    every_20 = cron("*/20 * * * * *")
    assert first_runs(every_20, utc(2026, 5, 1, 12, 0, 5), 4) == [
        utc(2026, 5, 1, 12, 0, 20),
        utc(2026, 5, 1, 12, 0, 40),
        utc(2026, 5, 1, 12, 1, 0),
        utc(2026, 5, 1, 12, 1, 20),
    ]
    assert every_20.last_until(utc(2026, 5, 1, 12, 0, 39)) == utc(2026, 5, 1, 12, 0, 20)


@pytest.mark.parametrize(
    ("alias", "expression"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("  @Daily ", "0 0 * * *"),
    ],
)
def test_an_alias_runs_like_its_expression(alias, expression):
    by_alias, by_expression = cron(alias, BERLIN), cron(expression, BERLIN)
    by_alias.validate()
    start = utc(2026, 3, 20)
    assert first_runs(by_alias, start, 3) == first_runs(by_expression, start, 3)
    assert by_alias.last_until(start) == by_expression.last_until(start)


def test_an_h_field_is_the_same_for_the_same_hash_id():
    start = utc(2026, 5, 1)
    runs = first_runs(cron("H H * * *", hash_id="job-1"), start, 3)
    again = first_runs(cron("H H * * *", hash_id="job-1"), start, 3)
    assert runs == again
    # a fixed time of day, chosen by the hash
    assert runs[1] - runs[0] == runs[2] - runs[1] == timedelta(days=1)
    assert first_runs(cron("H H * * *", hash_id="job-2"), start, 3) != runs


def test_an_h_field_spreads_within_its_range():
    timetable = cron("H/15 * * * *", hash_id="sync-mirrors")
    runs = first_runs(timetable, utc(2026, 5, 1) - US, 8)
    assert {run.minute for run in runs} == {runs[0].minute + 15 * k for k in range(4)}
    assert runs[0].minute < 15
    assert all(later - earlier == timedelta(minutes=15) for earlier, later in pairwise(runs))


# --- every and hourly ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timetable",
    [
        Timetable(kind="every", every=timedelta(minutes=90), start=utc(2026, 3, 28, 22, 10)),
        Timetable(kind="every", every=timedelta(seconds=7), start=utc(2026, 1, 1, 0, 0, 3)),
        Timetable(
            kind="every", every=timedelta(seconds=1, microseconds=250_000), start=utc(2026, 1, 1)
        ),
        Timetable(kind="hourly", start=utc(2026, 10, 24, 23, 15), timezone=BERLIN),
    ],
    ids=["90min", "7s", "1.25s", "hourly"],
)
def test_fixed_steps_run_at_start_plus_whole_steps(timetable):
    start, step = timetable.start, timetable.step
    assert step is not None
    assert first_runs(timetable, start - US, 30) == [start + step * k for k in range(30)]
    for k in (0, 1, 5, 29):
        run = start + step * k
        assert timetable.next_after(run) == run + step  # strictly after
        assert timetable.next_after(run - US) == run
        assert timetable.last_until(run) == run
        assert timetable.last_until(run + step - US) == run
    # before the start: the start is next, and nothing has run
    assert timetable.next_after(start - timedelta(days=400)) == start
    assert timetable.next_after(start - US) == start
    assert timetable.last_until(start - US) is None


def test_fixed_steps_far_from_the_start_do_not_drift():
    start = utc(2020, 1, 1, 0, 0, 3)
    timetable = Timetable(kind="every", every=timedelta(seconds=7), start=start)
    run = start + timedelta(seconds=7) * 10**7  # about two years and two months on
    assert timetable.next_after(run + timedelta(seconds=3)) == run + timedelta(seconds=7)
    assert timetable.last_until(run + timedelta(seconds=3)) == run
    assert timetable.last_until(run - US) == run - timedelta(seconds=7)


def test_hourly_steps_an_hour_of_real_time_across_a_dst_change():
    timetable = Timetable(kind="hourly", start=utc(2026, 10, 24, 20), timezone=BERLIN)
    runs = day_runs(timetable, BERLIN, BERLIN_FALL)
    assert len(runs) == 25


def test_every_second_from_a_start_in_a_dst_zone_has_no_gap():
    start = local(BERLIN, BERLIN_FALL)  # 00:00 CEST, before the fall-back
    timetable = Timetable(kind="every", every=timedelta(seconds=1), start=start, timezone=BERLIN)
    moment = utc(2026, 10, 25, 11)  # after the fall-back
    assert timetable.last_until(moment) == moment
    assert timetable.next_after(moment) == moment + timedelta(seconds=1)  # returns 11:59:59


def test_hourly_from_a_start_in_a_dst_zone_steps_real_hours():
    start = local(BERLIN, BERLIN_FALL)
    timetable = Timetable(kind="hourly", start=start, timezone=BERLIN)
    runs = day_runs(timetable, BERLIN, BERLIN_FALL)
    assert runs == [start.astimezone(UTC) + HOUR * k for k in range(25)]


# --- monthly, quarterly, yearly ------------------------------------------------------------------


def test_monthly_from_the_31st_clamps_to_each_month_end_without_drifting():
    timetable = Timetable(kind="monthly", start=utc(2026, 1, 31, 9))
    runs = first_runs(timetable, utc(2026, 1, 1), 7)
    assert [run.date() for run in runs] == [
        date(2026, 1, 31),
        date(2026, 2, 28),
        date(2026, 3, 31),  # back to the 31st: anchored to the start, not to February
        date(2026, 4, 30),
        date(2026, 5, 31),
        date(2026, 6, 30),
        date(2026, 7, 31),
    ]
    assert {run.time() for run in runs} == {datetime(2026, 1, 1, 9).time()}
    assert timetable.next_after(utc(2028, 2, 1)) == utc(2028, 2, 29, 9)  # a leap year
    assert timetable.last_until(utc(2026, 3, 30)) == utc(2026, 2, 28, 9)
    assert timetable.last_until(utc(2026, 3, 31, 9)) == utc(2026, 3, 31, 9)


def test_monthly_keeps_its_wall_time_in_its_zone():
    start = local(NEW_YORK, date(2026, 1, 31), 23, 30)  # already February in UTC
    timetable = Timetable(kind="monthly", start=start, timezone=NEW_YORK)
    runs = first_runs(timetable, start - US, 4)
    assert [run.astimezone(ZoneInfo(NEW_YORK)).replace(tzinfo=None) for run in runs] == [
        datetime(2026, 1, 31, 23, 30),
        datetime(2026, 2, 28, 23, 30),
        datetime(2026, 3, 31, 23, 30),  # after the spring change: 03:30 UTC, not 04:30
        datetime(2026, 4, 30, 23, 30),
    ]


def test_bimonthly_and_quarterly_clamp_and_return():
    bimonthly = Timetable(kind="bimonthly", start=utc(2026, 1, 31, 9))
    assert [run.date() for run in first_runs(bimonthly, utc(2026, 1, 1), 6)] == [
        date(2026, 1, 31),
        date(2026, 3, 31),
        date(2026, 5, 31),
        date(2026, 7, 31),
        date(2026, 9, 30),
        date(2026, 11, 30),
    ]
    quarterly = Timetable(kind="quarterly", start=utc(2025, 11, 30, 9))
    assert [run.date() for run in first_runs(quarterly, utc(2025, 1, 1), 6)] == [
        date(2025, 11, 30),
        date(2026, 2, 28),
        date(2026, 5, 30),  # the start's day again, not February's
        date(2026, 8, 30),
        date(2026, 11, 30),
        date(2027, 2, 28),
    ]
    assert quarterly.last_until(utc(2026, 5, 30, 8)) == utc(2026, 2, 28, 9)


def test_yearly_from_february_29():
    timetable = Timetable(kind="yearly", start=utc(2024, 2, 29, 9))
    runs = first_runs(timetable, utc(2024, 1, 1), 6)
    assert [run.date() for run in runs] == [
        date(2024, 2, 29),
        date(2025, 2, 28),
        date(2026, 2, 28),
        date(2027, 2, 28),
        date(2028, 2, 29),  # a leap year again
        date(2029, 2, 28),
    ]
    assert timetable.last_until(utc(2027, 3, 1)) == utc(2027, 2, 28, 9)
    assert timetable.next_after(utc(2027, 2, 28, 9)) == utc(2028, 2, 29, 9)
    assert timetable.last_until(utc(2024, 2, 29, 9) - US) is None


# --- once, manual, cron with a start -------------------------------------------------------------


def test_once_runs_at_its_start_only():
    at = local(BERLIN, date(2026, 7, 1), 14)
    timetable = Timetable(kind="once", start=at, timezone=BERLIN)
    timetable.validate()
    assert timetable.next_after(at - timedelta(days=30)) == at
    assert timetable.next_after(at - US) == at
    assert timetable.next_after(at - US).tzinfo == UTC
    assert timetable.next_after(at) is None
    assert timetable.next_after(at + timedelta(days=1)) is None
    assert timetable.last_until(at - US) is None
    assert timetable.last_until(at) == at
    assert timetable.last_until(at + timedelta(days=300)) == at
    assert timetable.first(at - HOUR) == at
    assert timetable.first(at + HOUR) == at  # owed: a single run whose moment passed runs at once


def test_manual_never_runs():
    timetable = Timetable(kind="manual")
    timetable.validate()
    for moment in (utc(2000, 1, 1), utc(2026, 5, 1), utc(2100, 1, 1)):
        assert timetable.next_after(moment) is None
        assert timetable.last_until(moment) is None
        assert timetable.first(moment) is None
    assert timetable.anchored(utc(2026, 5, 1)) == timetable


def test_a_cron_with_a_start_runs_nothing_before_it():
    start = utc(2026, 5, 1, 10, 30)
    timetable = cron("0 * * * *", start=start)
    assert timetable.next_after(utc(2026, 1, 1)) == utc(2026, 5, 1, 11)
    assert timetable.next_after(start - US) == utc(2026, 5, 1, 11)
    assert timetable.first(utc(2026, 1, 1)) == utc(2026, 5, 1, 11)
    assert timetable.last_until(utc(2026, 5, 1, 10, 59)) is None
    assert timetable.last_until(utc(2026, 5, 1, 11)) == utc(2026, 5, 1, 11)
    assert timetable.next_after(utc(2026, 5, 1, 11)) == utc(2026, 5, 1, 12)


def test_a_cron_start_on_a_run_includes_that_run():
    start = utc(2026, 5, 1, 10)
    timetable = cron("0 * * * *", start=start)
    assert timetable.next_after(utc(2026, 1, 1)) == start
    assert timetable.last_until(start) == start
    assert timetable.last_until(start - US) is None


# --- anchored and first ---------------------------------------------------------------------------

NOW = utc(2026, 1, 31, 10, 17, 23)  # no DST change within a month of it in the zones used


@pytest.mark.parametrize(
    ("timetable", "start"),
    [
        (Timetable(kind="every", every=timedelta(minutes=5)), NOW + timedelta(minutes=5)),
        (Timetable(kind="hourly"), NOW + HOUR),
        (Timetable(kind="daily", timezone=BERLIN), NOW + timedelta(days=1)),
        (Timetable(kind="weekly", timezone=NEW_YORK), NOW + timedelta(days=7)),
        (Timetable(kind="biweekly"), NOW + timedelta(days=14)),
        (Timetable(kind="monthly"), utc(2026, 2, 28, 10, 17, 23)),
        (Timetable(kind="monthly", timezone=BERLIN), utc(2026, 2, 28, 10, 17, 23)),
        (Timetable(kind="bimonthly"), utc(2026, 3, 31, 10, 17, 23)),
        (Timetable(kind="quarterly"), utc(2026, 4, 30, 10, 17, 23)),
        (Timetable(kind="yearly"), utc(2027, 1, 31, 10, 17, 23)),
    ],
    ids=lambda value: value.kind if isinstance(value, Timetable) else None,
)
def test_anchoring_without_a_start_sets_it_one_step_after_now(timetable, start):
    anchored = timetable.anchored(NOW)
    assert anchored.start == start
    assert anchored.start.utcoffset() == timedelta(0)
    assert anchored.kind == timetable.kind
    assert anchored.timezone == timetable.timezone
    assert anchored.first(NOW) == start
    assert anchored.next_after(NOW) == start
    assert anchored.last_until(NOW) is None


def test_anchoring_monthly_uses_the_wall_time_of_its_zone():
    now = utc(2026, 1, 31, 23, 30)  # already the 1st of February in Berlin
    anchored = Timetable(kind="monthly", timezone=BERLIN).anchored(now)
    assert anchored.start == local(BERLIN, date(2026, 3, 1), 0, 30)


def test_yearly_anchored_on_february_29():
    anchored = Timetable(kind="yearly").anchored(utc(2028, 2, 29, 6))
    assert anchored.start == utc(2029, 2, 28, 6)


@pytest.mark.parametrize(
    "timetable",
    [
        cron("0 * * * *", BERLIN),
        Timetable(kind="once", start=utc(2026, 3, 1)),
        Timetable(kind="manual"),
        Timetable(kind="every", every=timedelta(minutes=5), start=utc(2025, 12, 1, 0, 1)),
        Timetable(kind="hourly", start=utc(2026, 6, 1)),
        Timetable(kind="monthly", start=utc(2025, 1, 31, 8)),
        cron("0 * * * *", start=utc(2026, 6, 1)),
    ],
    ids=["cron", "once", "manual", "every", "hourly", "monthly", "cron-with-start"],
)
def test_anchoring_keeps_a_timetable_that_needs_no_start_or_has_one(timetable):
    assert timetable.anchored(NOW) == timetable


def test_first_is_the_start_while_it_is_ahead_then_the_next_run():
    timetable = Timetable(kind="every", every=timedelta(minutes=10), start=utc(2026, 5, 1, 12))
    assert timetable.first(utc(2026, 5, 1, 11)) == utc(2026, 5, 1, 12)
    assert timetable.first(utc(2026, 5, 1, 12)) == utc(2026, 5, 1, 12, 10)
    assert timetable.first(utc(2026, 5, 1, 12, 25)) == utc(2026, 5, 1, 12, 30)
    assert cron("0 * * * *").first(utc(2026, 5, 1, 12, 25)) == utc(2026, 5, 1, 13)


def test_anchoring_a_daily_timetable_across_a_dst_change_keeps_the_wall_time():
    now = local(BERLIN, date(2026, 3, 28), 12).astimezone(UTC)  # 12:00 CET, Saturday
    anchored = Timetable(kind="daily", timezone=BERLIN).anchored(now)
    assert anchored.start == local(BERLIN, BERLIN_SPRING, 12)  # 12:00 CEST, not 13:00


def test_a_daily_start_at_the_repeated_wall_time_is_its_first_run():
    start = local(BERLIN, BERLIN_FALL, 2, 30, fold=1).astimezone(UTC)  # 01:30 UTC
    timetable = Timetable(kind="daily", start=start, timezone=BERLIN)
    before = start - timedelta(hours=5)
    assert timetable.first(before) == start
    assert timetable.last_until(start) == start
    assert timetable.next_after(before) == start  # returns 00:30 UTC, before the start


# --- plan -----------------------------------------------------------------------------------------

HOURLY = Timetable(kind="every", every=HOUR, start=utc(2026, 5, 1))
DUE = utc(2026, 5, 1, 3)  # runs owed at 03:00 ... 07:00
LATE_NOW = utc(2026, 5, 1, 7, 30)
OWED = tuple(utc(2026, 5, 1, hour) for hour in range(3, 8))


def planned(catch_up: CatchUp, *, limit: int = 100, grace: float = 3600, **given) -> Plan:
    timetable = given.pop("timetable", HOURLY)
    due, now = given.pop("due", DUE), given.pop("now", LATE_NOW)
    return plan(timetable, due, now, catch_up=catch_up, limit=limit, grace=grace)


def test_catch_up_once_fires_just_the_latest_missed_run():
    result = planned(CatchUp.ONCE)
    assert result.fire == (utc(2026, 5, 1, 7),)
    assert result.next_run == utc(2026, 5, 1, 8)
    assert result.missed >= 1


def test_catch_up_all_fires_each_missed_run_in_order():
    result = planned(CatchUp.ALL)
    assert result.fire == OWED
    assert result.next_run == utc(2026, 5, 1, 8)
    assert result.missed == 0


def test_catch_up_all_fires_the_latest_runs_up_to_the_limit():
    result = planned(CatchUp.ALL, limit=3)
    assert result.fire == OWED[-3:]
    assert result.missed > 0
    assert planned(CatchUp.ALL, limit=5).fire == OWED
    assert planned(CatchUp.ALL, limit=5).missed == 0


def test_catch_up_skip_fires_the_latest_run_within_the_grace_period():
    result = planned(CatchUp.SKIP, grace=30 * 60)  # the 07:00 run is 30 minutes late
    assert result.fire == (utc(2026, 5, 1, 7),)
    assert result.next_run == utc(2026, 5, 1, 8)
    assert result.missed >= 1  # 03:00 to 06:00 dropped


def test_catch_up_skip_fires_nothing_past_the_grace_period():
    result = planned(CatchUp.SKIP, grace=30 * 60 - 1)
    assert result.fire == ()
    assert result.next_run == utc(2026, 5, 1, 8)
    assert result.missed >= 1


@pytest.mark.parametrize("catch_up", list(CatchUp))
def test_a_run_on_time_fires_once_whatever_the_catch_up(catch_up):
    now = utc(2026, 5, 1, 7, 0, 2)
    result = planned(catch_up, due=utc(2026, 5, 1, 7), now=now, grace=60)
    assert result.fire == (utc(2026, 5, 1, 7),)
    assert result.next_run == utc(2026, 5, 1, 8)
    assert result.missed == 0


@pytest.mark.parametrize("catch_up", list(CatchUp))
def test_next_run_is_the_first_run_after_now(catch_up):
    on_a_run = planned(catch_up, now=utc(2026, 5, 1, 7), grace=0)
    assert on_a_run.next_run == utc(2026, 5, 1, 8)  # strictly after now
    assert on_a_run.fire[-1:] == (utc(2026, 5, 1, 7),)  # late by 0 s: within any grace


def test_plan_for_a_cron():
    timetable = cron("30 2 * * *", BERLIN)
    due = local(BERLIN, date(2026, 3, 27), 2, 30).astimezone(UTC)
    now = utc(2026, 3, 30, 12)
    result = plan(timetable, due, now, catch_up=CatchUp.ALL, limit=10, grace=60)
    assert result.fire == (
        due,
        local(BERLIN, date(2026, 3, 28), 2, 30).astimezone(UTC),
        day_runs(timetable, BERLIN, BERLIN_SPRING)[0],
        local(BERLIN, date(2026, 3, 30), 2, 30).astimezone(UTC),
    )
    assert result.next_run == local(BERLIN, date(2026, 3, 31), 2, 30).astimezone(UTC)
    assert result.missed == 0


def test_plan_for_once_fires_its_run_and_has_no_next():
    at = utc(2026, 5, 1, 9)
    timetable = Timetable(kind="once", start=at)
    for catch_up in CatchUp:
        result = plan(
            timetable, at, at + timedelta(seconds=5), catch_up=catch_up, limit=10, grace=60
        )
        assert result == Plan(fire=(at,), next_run=None, missed=0)


def test_plan_fires_a_due_time_left_by_an_older_timetable():
    due = utc(2026, 5, 1, 7, 10)  # not a run of HOURLY; set before the timetable changed
    result = planned(CatchUp.ONCE, due=due, now=utc(2026, 5, 1, 7, 40))
    assert result.fire == (due,)
    assert result.next_run == utc(2026, 5, 1, 8)


@pytest.mark.parametrize("catch_up", list(CatchUp))
def test_plan_work_does_not_grow_with_how_long_ago_a_run_was_due(catch_up):
    timetable = Timetable(kind="every", every=timedelta(seconds=1), start=utc(2025, 1, 1))
    due = utc(2025, 1, 1, 0, 0, 1)  # a year and a bit ago: ~4e7 runs owed
    now = utc(2026, 3, 1, 12, 0, 0, 500_000)
    began = time.perf_counter()
    result = plan(timetable, due, now, catch_up=catch_up, limit=100, grace=60)
    elapsed = time.perf_counter() - began
    latest = utc(2026, 3, 1, 12)
    if catch_up is CatchUp.ALL:
        assert result.fire == tuple(latest - timedelta(seconds=k) for k in range(99, -1, -1))
    else:
        assert result.fire == (latest,)  # half a second late: within the grace
    assert result.missed > 0
    assert result.next_run == utc(2026, 3, 1, 12, 0, 1)
    assert elapsed < 2


def test_a_seconds_cron_looks_at_a_few_candidates_for_a_run_seconds_away(monkeypatch):
    """Counted, not timed: how many cron candidates finding the next run steps through."""
    steps = 0

    class Counting(croniter):
        def get_next(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal steps
            steps += 1
            return super().get_next(*args, **kwargs)

        def get_prev(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal steps
            steps += 1
            return super().get_prev(*args, **kwargs)

    monkeypatch.setattr(conveyor.cron, "croniter", Counting)
    timetable = cron("*/20 * * * * *")  # UTC: no DST change to look around
    now = utc(2026, 3, 1, 12, 0, 5)
    assert timetable.next_after(now) == utc(2026, 3, 1, 12, 0, 20)
    assert timetable.last_until(now) == utc(2026, 3, 1, 12)
    assert steps > 0  # the count works
    assert steps < 100  # ~2,160 here: 3 h of candidates either side, for each call


# --- validate -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"kind": "fortnightly"}, ["unknown kind 'fortnightly'", "monthly"]),
        ({"kind": "cron", "cron": "61 * * * *"}, ["invalid cron expression '61 * * * *'"]),
        ({"kind": "cron", "cron": "0 25 * * *"}, ["invalid cron expression '0 25 * * *'"]),
        ({"kind": "cron", "cron": "* * *"}, ["'* * *'", "3 fields", "5", "6 with seconds"]),
        ({"kind": "cron", "cron": "* * * * * * *"}, ["7 fields"]),
        ({"kind": "cron", "cron": ""}, ["empty"]),
        ({"kind": "cron", "cron": "0 0 30 2 *"}, ["invalid cron expression '0 0 30 2 *'"]),
        ({"kind": "every", "every": timedelta(milliseconds=500)}, ["at least one second"]),
        ({"kind": "every", "every": timedelta(seconds=-5)}, ["at least one second"]),
        ({"kind": "every", "every": timedelta(0)}, ["at least one second"]),
        ({"kind": "every"}, ["at least one second", "None"]),
        (
            {"kind": "cron", "cron": "0 * * * *", "timezone": "Mars/Olympus"},
            ["unknown time zone 'Mars/Olympus'"],
        ),
        ({"kind": "hourly", "timezone": ""}, ["unknown time zone ''"]),
        ({"kind": "daily", "start": datetime(2026, 1, 1, 9)}, ["start", "aware"]),
        ({"kind": "once", "start": datetime(2026, 1, 1, 9)}, ["start", "aware"]),
        ({"kind": "once"}, ["runs once", "moment"]),
    ],
    ids=[
        "unknown-kind",
        "minute-61",
        "hour-25",
        "three-fields",
        "seven-fields",
        "empty-cron",
        "never-matches",
        "half-second",
        "negative",
        "zero",
        "no-interval",
        "unknown-zone",
        "empty-zone",
        "naive-start",
        "naive-once",
        "once-without-start",
    ],
)
def test_validate_refuses_a_bad_timetable_naming_the_problem(fields, fragments):
    with pytest.raises(InvalidTimetable) as refused:
        Timetable(**fields).validate()
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_invalid_timetable_is_a_value_error():
    assert issubclass(InvalidTimetable, ValueError)


@pytest.mark.parametrize(
    "timetable",
    [
        cron("*/5 9-17 * * 1-5", NEW_YORK),
        cron("*/20 * * * * *"),
        cron("@Hourly"),
        cron("0 0 29 2 *"),  # leap days only: rare, but it does run
        cron("H H * * *", hash_id="nightly"),
        Timetable(kind="every", every=timedelta(seconds=1)),
        Timetable(kind="hourly"),
        Timetable(kind="daily", start=local(BERLIN, date(2026, 1, 1), 9), timezone=BERLIN),
        Timetable(kind="once", start=utc(2026, 1, 1)),
        Timetable(kind="manual"),
        Timetable(kind="yearly", timezone="Australia/Lord_Howe"),
    ],
)
def test_validate_accepts_a_good_timetable(timetable):
    timetable.validate()
