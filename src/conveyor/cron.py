"""Timetables: when each run of a schedule falls due, and what a late scheduler fires.

Pure functions of a timetable and a moment; no clock is read here (the scheduler passes
the store's). Cron expressions are parsed and iterated by ``croniter`` on the wall clock of
the schedule's time zone; this module maps wall times to moments, so that across a DST
change a run at a fixed hour is neither skipped (it moves past the gap) nor doubled (only
the first of two equal wall times counts), while a cron whose hour field is ``*`` runs in
every real hour, both repeated ones included.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

# How a schedule's runs are laid out.
CRON = "cron"  # a cron expression (five fields, or six with seconds first)
EVERY = "every"  # a fixed interval from the first run
ONCE = "once"  # one run, at a given moment
MANUAL = "manual"  # no timetable: runs only when asked to
DAY_STEPS = {"daily": 1, "weekly": 7, "biweekly": 14}  # same wall time, N days apart
MONTH_STEPS = {"monthly": 1, "bimonthly": 2, "quarterly": 3, "yearly": 12}
HOURLY = "hourly"  # every hour from the first run
KINDS = (CRON, EVERY, ONCE, MANUAL, HOURLY, *DAY_STEPS, *MONTH_STEPS)
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
EVERY_HOUR = ("*", "*/1", "0-23")
# Longest a DST change moves the wall clock (Lord Howe is 30 minutes, most are an hour).
SHIFT = timedelta(hours=3)
MIN_EVERY = timedelta(seconds=1)
CRON_LENGTH = 200


class CatchUp(StrEnum):
    """What a scheduler does with runs that fell due while none was running."""

    SKIP = "skip"  # drop them: only a run late by at most the grace period fires
    ONCE = "once"  # fire once for all of them (as the latest)
    ALL = "all"  # fire each of them, the latest ``catch_up_limit`` at most


class InvalidTimetable(ValueError):
    """A timetable that cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timetable:
    """When a schedule runs: its kind, and what that kind needs.

    ``start`` is the first run of ``every``, ``hourly`` and the calendar kinds (each later
    run is a whole number of steps from it), the only run of ``once``, and for ``cron`` the
    moment before which nothing runs. ``hash_id`` seeds cron's ``H`` fields.
    """

    kind: str
    cron: str = ""
    every: timedelta | None = None
    start: datetime | None = None
    timezone: str = "UTC"
    hash_id: str = ""

    def validate(self) -> None:
        """Raise ``InvalidTimetable`` naming what is wrong, if anything is."""
        if self.kind not in KINDS:
            raise InvalidTimetable(f"unknown kind {self.kind!r}; one of: {', '.join(KINDS)}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise InvalidTimetable(f"unknown time zone {self.timezone!r}") from e
        if self.start is not None and self.start.tzinfo is None:
            raise InvalidTimetable("its start must be an aware datetime")
        if self.kind == CRON:
            self._validate_cron()
        elif self.kind == EVERY:
            if self.every is None or self.every < MIN_EVERY:
                raise InvalidTimetable(
                    f"its interval must be at least one second, not {self.every!r}"
                )
        elif self.kind == ONCE and self.start is None:
            raise InvalidTimetable("a schedule that runs once needs the moment it runs at")

    def _validate_cron(self) -> None:
        if not self.cron.strip():
            raise InvalidTimetable("its cron expression is empty")
        if len(self.cron) > CRON_LENGTH:
            raise InvalidTimetable(f"its cron expression is over {CRON_LENGTH} characters")
        fields = self.expression.split()
        if len(fields) not in (5, 6):
            raise InvalidTimetable(
                f"cron expression {self.cron!r} has {len(fields)} fields; it needs 5 "
                "(minute hour day month weekday), or 6 with seconds first"
            )
        try:
            self._iterate(datetime(2000, 1, 1), backwards=False).__next__()
        except Exception as e:  # croniter raises several kinds for a bad expression
            raise InvalidTimetable(f"invalid cron expression {self.cron!r}: {e}") from e

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # ZoneInfo keeps one instance per key

    @property
    def expression(self) -> str:
        return ALIASES.get(self.cron.strip().lower(), self.cron.strip())

    @property
    def step(self) -> timedelta | None:
        """The fixed interval of ``every`` and ``hourly``; None for the other kinds."""
        return timedelta(hours=1) if self.kind == HOURLY else self.every

    def next_after(self, moment: datetime) -> datetime | None:
        """The first run strictly after ``moment`` (aware, UTC); None if there is none."""
        if self.kind == MANUAL:
            return None
        if self.kind == CRON:
            found = self._cron_next(moment)
            if found is not None and self.start is not None and found < self.start:
                return self._cron_next(self.start - timedelta(microseconds=1))
            return found
        if self.start is None:
            return None
        if self.kind == ONCE:
            return self.start.astimezone(UTC) if self.start > moment else None
        index = max(0, self._index_near(moment) - 1)
        while self._nth(index) <= moment:
            index += 1
        return self._nth(index)

    def last_until(self, moment: datetime) -> datetime | None:
        """The latest run at or before ``moment``; None if none is."""
        if self.kind == MANUAL:
            return None
        if self.kind == CRON:
            found = self._cron_last(moment)
            if found is None or (self.start is not None and found < self.start):
                return None
            return found
        if self.start is None or self.start > moment:
            return None
        if self.kind == ONCE:
            return self.start.astimezone(UTC)
        index = self._index_near(moment) + 1
        while index > 0 and self._nth(index) > moment:
            index -= 1
        return self._nth(index)

    def anchored(self, now: datetime) -> Timetable:
        """This timetable, with a start one step after ``now`` if it has none and needs one."""
        if self.start is not None or self.kind in (CRON, ONCE, MANUAL):
            return self
        if (step := self.step) is not None:
            start = now.astimezone(UTC) + step
        else:  # the same wall time, days or months later
            wall = now.astimezone(self.zone).replace(tzinfo=None)
            if self.kind in DAY_STEPS:
                wall += timedelta(days=DAY_STEPS[self.kind])
            else:
                wall = _add_months(wall, MONTH_STEPS[self.kind])
            start = wall.replace(tzinfo=self.zone, fold=0)
        return replace(self, start=start.astimezone(UTC))

    def first(self, now: datetime) -> datetime | None:
        """The first run of a timetable set now: its start, if that is still ahead.

        A single run whose moment has passed runs at once (it is owed).
        """
        if self.start is not None and self.kind == ONCE:
            return self.start.astimezone(UTC)
        if self.start is not None and self.start > now and self.kind != CRON:
            return self.start.astimezone(UTC)
        return self.next_after(now)

    # --- fixed steps -----------------------------------------------------------------------

    def _nth(self, index: int) -> datetime:
        """The run ``index`` steps after ``start``."""
        assert self.start is not None
        if (step := self.step) is not None:  # real time, whatever the start's zone
            return self.start.astimezone(UTC) + step * index
        if index == 0:
            return self.start.astimezone(UTC)  # the second of two equal wall times, too
        wall = self.start.astimezone(self.zone).replace(tzinfo=None)
        if self.kind in DAY_STEPS:
            wall += timedelta(days=DAY_STEPS[self.kind] * index)
        else:
            wall = _add_months(wall, MONTH_STEPS[self.kind] * index)
        return wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)

    def _index_near(self, moment: datetime) -> int:
        """About how many steps ``moment`` is after ``start`` (never more than one off)."""
        assert self.start is not None
        elapsed = (moment - self.start).total_seconds()
        if (step := self.step) is not None:
            return max(0, math.floor(elapsed / step.total_seconds()))
        if self.kind in DAY_STEPS:
            return max(0, math.floor(elapsed / (DAY_STEPS[self.kind] * 86400)))
        start, then = self.start.astimezone(self.zone), moment.astimezone(self.zone)
        months = (then.year - start.year) * 12 + then.month - start.month
        return max(0, months // MONTH_STEPS[self.kind])

    # --- cron --------------------------------------------------------------------------------

    @property
    def _every_hour(self) -> bool:
        fields = self.expression.split()
        return fields[len(fields) - 4] in EVERY_HOUR

    def _iterate(self, wall: datetime, *, backwards: bool) -> Iterator[datetime]:
        seconds = len(self.expression.split()) == 6
        kwargs: dict[str, Any] = {"second_at_beginning": seconds}
        if self.hash_id:
            kwargs["hash_id"] = self.hash_id
        runs = croniter(self.expression, wall, **kwargs)
        while True:
            yield runs.get_prev(datetime) if backwards else runs.get_next(datetime)

    def _moments(self, wall: datetime) -> list[datetime]:
        """The moments a wall time of the zone stands for, as runs of this cron."""
        first = wall.replace(tzinfo=self.zone, fold=0)
        second = wall.replace(tzinfo=self.zone, fold=1)
        exists = first.astimezone(UTC).astimezone(self.zone).replace(tzinfo=None) == wall
        if not exists:  # in a gap: a fixed hour runs just after it, an hourly cron skips it
            return [] if self._every_hour else [first.astimezone(UTC)]
        if first.utcoffset() != second.utcoffset() and self._every_hour:
            return [first.astimezone(UTC), second.astimezone(UTC)]
        return [first.astimezone(UTC)]

    def _steady(self, earlier: datetime, later: datetime) -> bool:
        """Say whether no clock change falls between two moments less than a day apart."""
        if later - earlier > timedelta(days=1):
            return False
        before, after = (
            (earlier - SHIFT).astimezone(self.zone),
            (later + SHIFT).astimezone(self.zone),
        )
        return before.utcoffset() == after.utcoffset()

    def _cron_quick(self, moment: datetime, *, backwards: bool) -> datetime | None:
        """The run next to ``moment`` when no clock change is near: one croniter step."""
        wall = moment.astimezone(self.zone).replace(tzinfo=None)
        start = wall + timedelta(microseconds=1) if backwards else wall
        try:
            found = next(self._iterate(start, backwards=backwards))
        except CroniterBadDateError:
            return None
        run = found.replace(tzinfo=self.zone).astimezone(UTC)
        earlier, later = (run, moment) if backwards else (moment, run)
        return run if self._steady(earlier, later) else None

    def _cron_next(self, moment: datetime) -> datetime | None:
        if (quick := self._cron_quick(moment, backwards=False)) is not None and quick > moment:
            return quick
        wall = moment.astimezone(self.zone).replace(tzinfo=None)
        best: datetime | None = None
        try:
            for candidate in self._iterate(wall - SHIFT, backwards=False):
                found = [m for m in self._moments(candidate) if m > moment]
                if found and (best is None or min(found) < best):
                    best = min(found)
                if best is not None and candidate - wall > SHIFT + (best - moment):
                    break
        except CroniterBadDateError:  # no run in the next decades
            pass
        return best

    def _cron_last(self, moment: datetime) -> datetime | None:
        if (quick := self._cron_quick(moment, backwards=True)) is not None and quick <= moment:
            return quick
        wall = moment.astimezone(self.zone).replace(tzinfo=None)
        best: datetime | None = None
        try:
            for candidate in self._iterate(wall + SHIFT + timedelta(seconds=1), backwards=True):
                found = [m for m in self._moments(candidate) if m <= moment]
                if found and (best is None or max(found) > best):
                    best = max(found)
                if best is not None and wall - candidate > SHIFT + (moment - best):
                    break
        except CroniterBadDateError:
            pass
        return best


def _add_months(wall: datetime, months: int) -> datetime:
    """``wall`` moved by whole months, its day kept or, past a month's end, the last day."""
    index = wall.month - 1 + months
    year, month = wall.year + index // 12, index % 12 + 1
    day = min(wall.day, calendar.monthrange(year, month)[1])
    return wall.replace(year=year, month=month, day=day)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a scheduler does for one schedule now: the runs it fires, and the next one."""

    fire: tuple[datetime, ...]
    next_run: datetime | None
    missed: int  # runs that fell due and are not fired (a lower bound when many)


def plan(
    timetable: Timetable,
    due: datetime,
    now: datetime,
    *,
    catch_up: CatchUp,
    limit: int,
    grace: float,
) -> Plan:
    """The runs to fire for a schedule whose next run, ``due``, is at or before ``now``.

    Runs from ``due`` to ``now`` are owed; ``catch_up`` says which of them fire. The work
    does not grow with how long no scheduler ran: runs are counted back from ``now``.
    """
    latest = timetable.last_until(now)
    following = timetable.next_after(now)
    if latest is None or latest < due:
        # ``due`` was set by an older timetable (or is its only run): it is the one owed.
        latest = due
    owed = [latest]
    if catch_up is CatchUp.ALL:
        while len(owed) < limit:
            earlier = timetable.last_until(owed[-1] - timedelta(microseconds=1))
            if earlier is None or earlier < due:
                break
            owed.append(earlier)
        owed.reverse()
    missed = 1 if owed[0] > due else 0  # runs before the oldest fired: at least one
    if catch_up is CatchUp.SKIP and (now - latest).total_seconds() > grace:
        return Plan(fire=(), next_run=following, missed=len(owed) + missed)
    return Plan(fire=tuple(owed), next_run=following, missed=missed)
