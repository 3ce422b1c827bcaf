"""The in-process store's monitor reads, workers registry, prune and expire."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.backends.memory import watching
from conveyor.records import (
    FailedJob,
    PickupLatency,
    QueueSelector,
    QueueStats,
    RunningJob,
    Throughput,
    WorkerInfo,
)

if TYPE_CHECKING:
    from conveyor.backends.memory.tables import Tables


class MemoryHousekeeping(StoreBackend):
    """Read where the queues stand, keep the workers registry, delete finished jobs."""

    if TYPE_CHECKING:
        _tables: Tables  # what ``MemoryBackend`` has

    # --- the workers registry -----------------------------------------------------------

    def register_worker(self, info: WorkerInfo) -> None:
        now = clock.now()
        row = replace(
            info,
            backend=self.alias,
            supervisor=info.supervisor or None,
            started_at=info.started_at or now,
            last_beat_at=now,
            stopped_at=None,
            ended="",
        )
        with self._tables.lock:
            self._tables.register(row)

    def end_worker(self, worker_id: str, ended: str) -> None:
        now = clock.now()
        with self._tables.lock:
            self._tables.end_worker(worker_id, ended, now)

    def workers(self, *, alive: bool = True) -> list[WorkerInfo]:
        with self._tables.lock:
            rows = [w for w in self._tables.workers.values() if not alive or w.stopped_at is None]
        return sorted(rows, key=lambda w: (w.started_at or datetime.min, w.id))

    # --- what a monitor reads -----------------------------------------------------------

    def stats(
        self, queues: QueueSelector | None = None, *, finished_since: datetime | None = None
    ) -> QueueStats:
        with self._tables.lock:
            counts = self._tables.counts(queues, finished_since)
        return QueueStats.from_counts(dict(counts))

    def running(self, queues: QueueSelector | None = None, *, limit: int = 100) -> list[RunningJob]:
        with self._tables.lock:
            return watching.running(self._tables, queues, limit)

    def recent_failures(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 20
    ) -> list[FailedJob]:
        with self._tables.lock:
            return watching.recent_failures(self._tables, since, queues, limit)

    def pickup_latency(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 500
    ) -> PickupLatency:
        with self._tables.lock:
            return watching.pickup_latency(self._tables, since, queues, limit)

    def throughput(
        self, since: datetime, *, step: int = 60, queues: QueueSelector | None = None
    ) -> list[Throughput]:
        with self._tables.lock:
            return watching.throughput(self._tables, since, step, queues)

    # --- deleting finished jobs ---------------------------------------------------------

    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        deleted = 0
        while True:
            with self._tables.lock:
                pruned, more = self._tables.prune(finished_before, batch)
            deleted += pruned
            if not more:
                return deleted
            time.sleep(pause)

    def expire(self, *, batch: int = 1000, pause: float = 0.01, limit: int | None = None) -> int:
        deleted = 0
        while limit is None or deleted < limit:
            size = batch if limit is None else min(batch, limit - deleted)
            with self._tables.lock:
                expired, more = self._tables.expire(clock.now(), size)
            deleted += expired
            if not more:
                break
            if limit is None or deleted < limit:
                time.sleep(pause)
        return deleted
