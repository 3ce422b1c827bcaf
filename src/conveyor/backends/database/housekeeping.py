"""The database backend's monitor reads, workers registry, prune and expire."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from django.db import DatabaseError

from conveyor.backends.base import StoreBackend
from conveyor.backends.database import operations, registry
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
    from conveyor.backends.database.store import Store


class DatabaseHousekeeping(StoreBackend):
    """Read where the queues stand, keep the workers registry, delete finished jobs."""

    if TYPE_CHECKING:  # what ``DatabaseBackend`` has
        worker_store: Store

        def _raise_if_not_migrated(self, error: DatabaseError) -> None: ...

    # --- the workers registry -----------------------------------------------------------

    def register_worker(self, info: WorkerInfo) -> None:
        try:
            registry.register_worker(self.worker_store, info)
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise

    def end_worker(self, worker_id: str, ended: str) -> None:
        registry.end_worker(self.worker_store, worker_id, ended)

    def workers(self, *, alive: bool = True) -> list[WorkerInfo]:
        return registry.workers(self.worker_store, alive)

    # --- what a monitor reads -----------------------------------------------------------

    def stats(
        self, queues: QueueSelector | None = None, *, finished_since: datetime | None = None
    ) -> QueueStats:
        return operations.stats(self.worker_store, queues, finished_since)

    def running(self, queues: QueueSelector | None = None, *, limit: int = 100) -> list[RunningJob]:
        return operations.running(self.worker_store, queues, limit)

    def recent_failures(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 20
    ) -> list[FailedJob]:
        return operations.recent_failures(self.worker_store, since, queues, limit)

    def pickup_latency(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 500
    ) -> PickupLatency:
        return operations.pickup_latency(self.worker_store, since, queues, limit)

    def throughput(
        self, since: datetime, *, step: int = 60, queues: QueueSelector | None = None
    ) -> list[Throughput]:
        return operations.throughput(self.worker_store, since, step, queues)

    # --- deleting finished jobs ---------------------------------------------------------

    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        return operations.prune(self.worker_store, finished_before, batch, pause)

    def expire(self, *, batch: int = 1000, pause: float = 0.01, limit: int | None = None) -> int:
        return operations.expire(self.worker_store, batch, pause, limit)
