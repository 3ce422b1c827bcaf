"""Which of a worker process's queues are paused, and when the first timed pause ends.

A process reads the paused queues from its store about once a second, and at every claim
of an idle process while some queue is paused (it was woken: that queue may have been
resumed). It claims only from the queues it serves less those paused. Nothing wakes an idle
process when a timed pause runs out, so it waits no longer than the first such end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.records import QueueSelector

logger = logging.getLogger(__name__)

PAUSE_LOOK = 1.0  # seconds between looks at which queues are paused


class Pauses:
    """The pauses of the queues one process serves, as last read from the store."""

    def __init__(self, backend: StoreBackend, queues: QueueSelector) -> None:
        self.backend = backend
        self.queues = queues
        self.looked, self.paused = -PAUSE_LOOK, frozenset[str]()
        self.ends: list[datetime] = []  # when timed pauses end (store clock)
        self.failed = False

    def serving(self, idle: bool) -> QueueSelector:
        """The queues to claim from now: the process's own, less those paused.

        The pauses are looked at about once a second, and at every claim of an ``idle``
        process while some queue is paused (it was woken: that queue may have been resumed).
        """
        now = time.monotonic()
        if now >= self.looked + PAUSE_LOOK or (idle and self.paused):
            self.looked = now
            self._look()
        if not self.paused:
            return self.queues
        return replace(self.queues, exclude=self.queues.exclude | self.paused)

    def first_end_in(self) -> float | None:
        """Seconds until the first timed pause of a queue served here ends; None if none.

        The time may be zero or less: the pause seems over by this machine's clock.
        """
        if not self.ends:
            return None
        return (min(self.ends) - clock.aware(clock.now())).total_seconds()

    def _look(self) -> None:
        try:
            found = self.backend.paused_queues()
            self.paused = frozenset(name for name in found if self.queues.allows(name))
            self.ends = [
                clock.aware(end)
                for name, end in found.items()
                if end is not None and self.queues.allows(name)
            ]
        except Exception as e:  # a store without the table yet (no migrate): no pauses
            if not self.failed:
                logger.warning("Cannot read which queues are paused: %s: %s", type(e).__name__, e)
            self.failed, self.paused, self.ends = True, frozenset(), []
        else:
            self.failed = False
