"""Firing schedules from every supervisor: no leader, no "run only one scheduler".

At start-up the supervisor syncs the code schedules into the store. Then, about once a
second, it asks the store to fire the schedules that are due; the store fires each due
time once however many supervisors ask at the same moment (``fire_schedules``), so any
number of workers on any number of machines may run this. Due times are read on the
store's clock, never this machine's. An error is logged and the next look tries again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from django.db import connections

from conveyor.backends.base import StoreBackend
from conveyor.records import Fired

logger = logging.getLogger(__name__)

EVERY = 1.0  # seconds between looks for due schedules
LIMIT = 100  # schedules one look fires at most (more are fired at the next)
WARN_EVERY = 60.0  # seconds between warnings while schedules cannot be fired


class Scheduler:
    """Fire ``backend``'s due schedules, a look every ``every`` seconds (``now``: a clock)."""

    def __init__(
        self,
        backend: StoreBackend,
        *,
        every: float = EVERY,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.every = every
        self.now = now
        self.next_look = now()
        self.synced = False
        self.failing_since: float | None = None
        self.warned = 0.0

    def sync(self) -> bool:
        """Make the store's code schedules those this code declares; False if it failed."""
        from conveyor.schedules import declared

        try:
            report = self.backend.sync_schedules(declared(self.backend.alias))
        except Exception as e:
            connections.close_all()
            logger.error(
                "Could not sync the code schedules of backend %r: %s: %s. They fire as "
                "stored; trying again in a moment.",
                self.backend.alias,
                type(e).__name__,
                e,
            )
            return False
        self.synced = True
        for verb, names in (
            ("Added", report.added),
            ("Updated", report.changed),
            ("Retired", report.retired),
        ):
            if names:
                logger.info("%s schedule(s) %s.", verb, ", ".join(names))
        return True

    def tick(self) -> list[Fired]:
        """Fire the due schedules, if a look is due; return the runs fired."""
        now = self.now()
        if now < self.next_look:
            return []
        self.next_look = now + self.every * random.uniform(0.8, 1.0)
        if not self.synced and not self.sync():
            self.next_look = now + 10 * self.every
        try:
            fired = self.backend.fire_schedules(LIMIT)
        except Exception as e:
            connections.close_all()
            if self.failing_since is None or now - self.warned >= WARN_EVERY:
                logger.warning(
                    "Could not fire schedules (%s: %s); trying again every second%s.",
                    type(e).__name__,
                    e,
                    ""
                    if self.failing_since is None
                    else f" (failing for {now - self.failing_since:.0f}s)",
                )
                self.warned = now
            if self.failing_since is None:
                self.failing_since = now
            return []
        if self.failing_since is not None:
            logger.info("Schedules fire again.")
            self.failing_since = None
        if fired:
            self.next_look = now  # a look that fired may have left more for the next tick
        return fired


class SchedulerThread:
    """A daemon thread firing due schedules beside an in-process worker."""

    def __init__(self, backend: StoreBackend, *, every: float = EVERY) -> None:
        self.scheduler = Scheduler(backend, every=every)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="conveyor-scheduler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.scheduler.sync()
            while not self.stopped.wait(max(0.0, self.scheduler.next_look - time.monotonic())):
                self.scheduler.tick()
        finally:
            connections.close_all()  # this thread's own connections

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped.set()
        self.thread.join(timeout=timeout)
