"""The stores' clock: the real one, or one a test moved forward instead of sleeping.

A store compares times with its own clock: the database's (leases, due times) or, for the
in-process store, this process's. ``conveyor.testing.store_clock()`` moves both forward
for the code of one test, so "two leases later" or "an hour later" takes no time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import overload

from django.conf import settings
from django.utils import timezone

_offset = 0.0  # seconds added to every reading, in this process


def offset() -> float:
    """Seconds the stores' clock is ahead of the real one (0.0 outside tests)."""
    return _offset


def now() -> datetime:
    """The current time on the stores' clock."""
    return timezone.now() + timedelta(seconds=_offset) if _offset else timezone.now()


def at(timestamp: float) -> datetime:
    """A POSIX timestamp as Django's datetimes are: aware (UTC), or naive with ``USE_TZ`` off."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment if settings.USE_TZ else timezone.make_naive(moment)


def set_offset(seconds: float) -> None:
    """Move the stores' clock to ``seconds`` ahead of the real one (for tests)."""
    global _offset
    _offset = float(seconds)


def aware(moment: datetime) -> datetime:
    """A datetime read from a store, as an aware one (naive ones are in ``TIME_ZONE``)."""
    if timezone.is_aware(moment):
        return moment
    return timezone.make_aware(moment) if not settings.USE_TZ else moment.replace(tzinfo=UTC)


@overload
def stored(moment: datetime) -> datetime: ...
@overload
def stored(moment: None) -> None: ...
def stored(moment: datetime | None) -> datetime | None:
    """An aware datetime as Django stores it: as it is, or naive with ``USE_TZ`` off."""
    if moment is None or settings.USE_TZ:
        return moment
    return timezone.make_naive(moment)
