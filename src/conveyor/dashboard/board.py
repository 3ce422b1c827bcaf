"""What the dashboard shows, read through the store's verbs, the same on every backend."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, task_backends

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.monitor import Watcher, describe, iso, stores
from conveyor.monitoring import WINDOW, Snapshot, online
from conveyor.records import QueueSelector, Throughput

HISTORY = 3600  # seconds of throughput the chart shows
STEP = 60  # seconds per bar


def refresh() -> float:
    """Seconds between two looks of an open page: ``CONVEYOR_DASHBOARD_REFRESH`` (3)."""
    return float(getattr(settings, "CONVEYOR_DASHBOARD_REFRESH", 3.0))


def chosen(alias: str | None) -> StoreBackend | None:
    """The store backend ``alias`` names (the default one if None); None if it is not one."""
    known = stores()
    if alias is None:
        alias = DEFAULT_TASK_BACKEND_ALIAS if DEFAULT_TASK_BACKEND_ALIAS in known else None
        alias = alias or (known[0] if known else None)
    if alias not in known:
        return None
    backend = task_backends[alias]
    assert isinstance(backend, StoreBackend)
    return backend


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueRow:
    name: str
    ready: int
    scheduled: int
    running: int
    succeeded: int  # in the last minute
    failed: int
    paused: bool = False
    paused_until: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Board:
    """One look at a backend, as the pages show it."""

    snapshot: Snapshot
    queues: list[QueueRow] = field(default_factory=list)
    throughput: list[Throughput] = field(default_factory=list)
    online: int = 0
    error: str = ""

    @property
    def chart(self) -> dict[str, Any]:
        """The numbers the page's script draws, as JSON values."""
        stats = self.snapshot.stats
        return {
            "at": iso(self.snapshot.checked_at),
            "step": STEP,
            "throughput": [
                {"t": iso(t.start), "succeeded": t.succeeded, "failed": t.failed}
                for t in self.throughput
            ],
            "depth": {"ready": stats.ready, "scheduled": stats.scheduled, "running": stats.running},
            "ok": not self.error,
        }


def read(backend: StoreBackend) -> Board:
    """Look at ``backend`` now; an unreachable store is said, never raised."""
    # A broken connection the request shares is closed when the request ends, by Django.
    snapshot = Watcher(backend, QueueSelector(), refresh(), reset=backend.close).look()
    error = snapshot.error
    paused: dict[str, datetime | None] = {}
    history: list[Throughput] = []
    if not error:
        try:
            with backend.reading():
                paused = backend.paused_queues()
                since = clock.now() - timedelta(seconds=HISTORY)
                found = _throughput(backend, since, snapshot.checked_at)
            history = every_step(found, since, snapshot.checked_at)
        except Exception as e:  # any store, any driver: the page says so
            backend.close()
            error = describe(e)
    up = sum(online(w, snapshot.checked_at, snapshot.lease) for w in snapshot.workers)
    return Board(
        snapshot=snapshot,
        queues=_queues(snapshot, paused),
        throughput=history,
        online=up,
        error=error,
    )


# Per backend: the intervals already read that no job can still end in, until when, and when
# the whole hour was last read.
_read_before: dict[str, tuple[float, dict[float, Throughput], float]] = {}
_read_lock = threading.Lock()
SETTLED = 2 * STEP  # seconds after which an interval is read no more (outcomes come late) ...
REREAD = 600.0  # ... but for a whole read every ten minutes (a store that was away, say)


def _throughput(backend: StoreBackend, since: datetime, now: datetime) -> list[Throughput]:
    """The last hour's throughput: only the intervals not read yet, or not settled, are read
    from the store; each open page asks every few seconds."""
    first = Throughput.bucket(clock.aware(since), STEP)
    with _read_lock:
        settled_until, kept, whole_at = _read_before.get(backend.alias, (0.0, {}, -REREAD))
    if time.monotonic() - whole_at >= REREAD:
        settled_until, kept, whole_at = 0.0, {}, time.monotonic()
    start = max(first, settled_until)
    fresh = backend.throughput(clock.at(start), step=STEP)
    merged = {at: t for at, t in kept.items() if first <= at < start}
    merged |= {t.start.timestamp(): t for t in fresh}
    late = max(SETTLED, backend.conveyor_options.lease + STEP)
    late = -(-late // STEP) * STEP  # whole intervals: one is never read half
    until = max(Throughput.bucket(clock.aware(now), STEP) - late, start)
    with _read_lock:  # a look that began earlier and ends later does not move it back
        if until >= _read_before.get(backend.alias, (0.0, {}, 0.0))[0]:
            settled = {at: t for at, t in merged.items() if at < until}
            _read_before[backend.alias] = (until, settled, whole_at)
    return [merged[at] for at in sorted(merged)]


def every_step(found: list[Throughput], since: datetime, now: datetime) -> list[Throughput]:
    """``found`` with the intervals in which nothing ended put in, from ``since`` to ``now``."""
    by_start = {t.start.timestamp(): t for t in found}
    start = Throughput.bucket(clock.aware(since), STEP) + STEP
    end = Throughput.bucket(clock.aware(now), STEP)
    steps = []
    while start <= end:
        moment = datetime.fromtimestamp(start, UTC)
        steps.append(by_start.get(start) or Throughput(start=moment))
        start += STEP
    return steps


def _queues(s: Snapshot, paused: dict[str, datetime | None]) -> list[QueueRow]:
    per_minute = 60 / WINDOW
    rows = []
    for name in sorted(set(s.queues) | set(s.stats.by_queue) | set(paused)):
        counts = s.stats.by_queue.get(name, {})
        rows.append(
            QueueRow(
                name=name,
                ready=counts.get("ready", 0),
                scheduled=counts.get("scheduled", 0),
                running=counts.get("running", 0),
                succeeded=round(counts.get("successful", 0) * per_minute),
                failed=round(counts.get("failed", 0) * per_minute),
                paused=name in paused,
                paused_until=paused.get(name),
            )
        )
    return rows
