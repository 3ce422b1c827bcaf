"""Where a backend stands, read through the store's verbs only, on any store.

``status_document()`` is ``conveyor status --json``. For ``conveyor monitor``,
``Watcher.look()`` reads a ``Snapshot`` (a frozen value), ``conveyor.monitoring.render()``
turns one into something ``rich`` draws, and ``Monitor.run()`` repeats the two until Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections
from django.tasks import task_backends
from rich.console import Console
from rich.live import Live

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.monitoring import (
    WINDOW,
    Snapshot,
    describe_timetable,
    online,
    render,
    schedule_state,
)
from conveyor.records import (
    STAT_NAMES,
    FailedJob,
    QueueSelector,
    QueueStats,
    ScheduleInfo,
    WorkerInfo,
)

LOOKBACK = 3600.0  # failures of the last hour are listed
# Each look for failures reaches this far behind the previous one: a failure is saved a
# little after it ends (outcomes are saved in groups), and clocks differ a little.
OVERLAP = 60.0
RUNNING_SHOWN = 20
FAILURES_SHOWN = 10
SCHEDULES_SHOWN = 8


def stores() -> list[str]:
    """The aliases of ``TASKS`` whose backend a worker drives: the ones the dashboard shows."""
    found = []
    for alias in settings.TASKS:
        try:
            backend = task_backends[alias]
        except Exception:  # a broken entry: Django's checks name it; the others still show
            continue
        if isinstance(backend, StoreBackend) and not backend.runs_inline:
            found.append(alias)
    return found


# --- one JSON document (``conveyor status --json``) ----------------------------------------


def iso(moment: datetime | None) -> str | None:
    """An ISO 8601 time with its offset, or None."""
    return None if moment is None else clock.aware(moment).isoformat()


def status_document(
    stats: QueueStats,
    workers: Sequence[WorkerInfo],
    schedules: Sequence[ScheduleInfo],
    *,
    backend: str,
    queues: Collection[str] = (),
    now: datetime,
    lease: float,
) -> dict[str, Any]:
    """Where a backend stands, as plain JSON values with the same keys every time.

    ``queues`` are listed even when they hold no job. Times are ISO 8601 with an offset.
    """
    by_queue = {name: dict.fromkeys(STAT_NAMES, 0) for name in queues}
    for name, counts in stats.by_queue.items():
        by_queue[name] = {state: counts.get(state, 0) for state in STAT_NAMES}
    return {
        "backend": backend,
        "generated_at": iso(now),
        "queues": dict(sorted(by_queue.items())),
        "totals": {state: getattr(stats, state) for state in STAT_NAMES},
        "workers": [_worker(info, now, lease) for info in workers],
        "schedules": [_schedule(info) for info in schedules],
    }


def _worker(info: WorkerInfo, now: datetime, lease: float) -> dict[str, Any]:
    return {
        "id": info.id,
        "kind": info.kind,
        "host": info.host,
        "pid": info.pid,
        "supervisor": info.supervisor,
        "queues": info.queues,
        "threads": info.threads,
        "started_at": iso(info.started_at),
        "last_beat_at": iso(info.last_beat_at),
        "online": online(info, now, lease),
    }


def _schedule(info: ScheduleInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "task": info.spec.task_path,
        "timetable": describe_timetable(info),
        "state": schedule_state(info),
        "source": info.spec.source,
        "next_run_at": iso(info.next_run_at),
        "last_run_at": iso(info.last_run_at),
        "runs": info.runs,
    }


# --- the live view (``conveyor monitor``) ------------------------------------------------------


class Watcher:
    """Read snapshots of one backend; keep the failures seen, so each look reads only new ones."""

    def __init__(
        self,
        backend: StoreBackend,
        queues: QueueSelector,
        interval: float,
        *,
        reset: Callable[[], object] = connections.close_all,
    ) -> None:
        """``reset`` runs after a failed look: by default every connection is closed, to be
        opened afresh by the next look (a web page, inside a request, closes less)."""
        self.backend = backend
        self.reset = reset
        self.selector = queues
        self.interval = interval
        self.queues = tuple(sorted(name for name in backend.queues if queues.allows(name)))
        self.last: Snapshot | None = None
        self.failures: tuple[FailedJob, ...] = ()
        self.failures_read_at: datetime | None = None

    def look(self) -> Snapshot:
        """Read the backend now; if it cannot be reached, say so over the last good look."""
        now = clock.now()
        try:
            with self.backend.reading():
                self.last = self._read(now)
        except Exception as e:  # any store, any driver: the monitor shows it and goes on
            self.reset()
            before = self.last or self._empty(now)
            return replace(before, checked_at=now, error=describe(e))
        return self.last

    def _empty(self, now: datetime) -> Snapshot:
        return Snapshot(
            backend=self.backend.alias,
            taken_at=None,
            checked_at=now,
            interval=self.interval,
            lease=self.backend.conveyor_options.lease,
            queues=self.queues,
            selector=self.selector,
        )

    def _read(self, now: datetime) -> Snapshot:
        store, queues = self.backend, self.selector
        recent = now - timedelta(seconds=WINDOW)
        return replace(
            self._empty(now),
            taken_at=now,
            stats=store.stats(queues, finished_since=recent),
            workers=tuple(store.workers()),
            running=tuple(store.running(queues, limit=RUNNING_SHOWN)),
            failures=self._failures(now),
            latency=store.pickup_latency(recent, queues),
            schedules=next_schedules(store.schedules()),
        )

    def _failures(self, now: datetime) -> tuple[FailedJob, ...]:
        oldest = now - timedelta(seconds=LOOKBACK)
        since = oldest
        if self.failures_read_at is not None:
            since = max(oldest, self.failures_read_at - timedelta(seconds=OVERLAP))
        found = self.backend.recent_failures(since, self.selector, limit=FAILURES_SHOWN)
        kept = {f.id: f for f in (*self.failures, *found) if f.finished_at >= oldest}
        newest = sorted(kept.values(), key=lambda f: f.finished_at, reverse=True)
        self.failures, self.failures_read_at = tuple(newest[:FAILURES_SHOWN]), now
        return self.failures


def next_schedules(schedules: list[ScheduleInfo]) -> tuple[ScheduleInfo, ...]:
    """The schedules that run next (those with no next run last), a few of them."""
    live = [info for info in schedules if not info.retired]
    live.sort(key=lambda i: (i.next_run_at is None, i.next_run_at or datetime.max, i.name))
    return tuple(live[:SCHEDULES_SHOWN])


def describe(error: BaseException) -> str:
    """An error in one line: its class and the first line of its message."""
    first = next(iter(str(error).strip().splitlines()), "")
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text[:300]


class Monitor:
    """Draw a backend's snapshot every ``interval`` seconds until Ctrl-C (or once)."""

    def __init__(
        self,
        backend: StoreBackend,
        queues: QueueSelector,
        *,
        interval: float = 2.0,
        once: bool = False,
        console: Console | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.watcher = Watcher(backend, queues, interval)
        self.interval = interval
        self.once = once
        self.console = console or Console()
        self.sleep = sleep

    def run(self) -> int:
        """Show the backend; return 0 (1 if ``once`` and the store could not be reached)."""
        if self.once:
            snapshot = self.watcher.look()
            self.console.print(render(snapshot))
            return 1 if snapshot.error else 0
        try:
            with _stop_on_sigterm():
                if self.console.is_terminal:
                    self._live()
                else:  # a file or a pipe: one frame after another
                    while True:
                        self.console.print(render(self.watcher.look()))
                        self.sleep(self.interval)
        except KeyboardInterrupt:
            pass
        return 0

    def _live(self) -> None:
        with Live(
            console=self.console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        ) as live:
            while True:
                live.update(render(self.watcher.look()), refresh=True)
                self.sleep(self.interval)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Let SIGTERM end the view as Ctrl-C does, so the terminal is put back either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
