"""Deleting finished jobs past their retention, a batch at a time, from the supervisor.

About once a minute (with jitter, so that supervisors started together spread out) the
supervisor asks the store to delete one batch of expired jobs; while a batch comes back
full it deletes another at each of its ticks, so that a backlog drains without holding up
heartbeats or time limits. An error is logged and tried again at the next round.
"""

from __future__ import annotations

import logging
import random
import time

from django.db import connections

from conveyor.backends.base import WorkerStore

logger = logging.getLogger(__name__)

EVERY = 60.0  # seconds between rounds, give or take a fifth
BATCH = 500  # jobs one tick deletes at most


class Expiry:
    """Delete expired jobs of ``store``: a round every ``every`` seconds, a batch per tick."""

    def __init__(self, store: WorkerStore, *, every: float = EVERY, batch: int = BATCH) -> None:
        self.store = store
        self.every = every
        self.batch = batch
        self.next_run = time.monotonic() + every * random.uniform(0.1, 1.0)
        self.deleted = 0  # in the current round

    def tick(self, now: float | None = None) -> int:
        """Delete one batch if one is due; return how many jobs were deleted."""
        now = time.monotonic() if now is None else now
        if now < self.next_run:
            return 0
        try:
            deleted = self.store.expire(batch=self.batch, pause=0.0, limit=self.batch)
        except Exception as e:
            connections.close_all()
            logger.warning(
                "Could not delete expired jobs (%s: %s); trying again in a minute or so.",
                type(e).__name__,
                e,
            )
            self._next_round(now)
            return 0
        self.deleted += deleted
        if deleted >= self.batch:
            self.next_run = now  # more are due: the next batch at the next tick
        else:
            if self.deleted:
                logger.info("Deleted %d job(s) kept past their retention.", self.deleted)
            self._next_round(now)
        return deleted

    def _next_round(self, now: float) -> None:
        self.deleted = 0
        self.next_run = now + self.every * random.uniform(0.8, 1.2)
