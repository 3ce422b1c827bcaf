"""The database backend's controls: cancel, run now and progress of a job; queue pauses."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.tasks.exceptions import TaskResultDoesNotExist

from conveyor.backends.base import StoreBackend
from conveyor.backends.database import queues as queue_admin
from conveyor.backends.database import transitions
from conveyor.backends.database.models import Job

if TYPE_CHECKING:
    from conveyor.backends.database.store import Store
    from conveyor.records import Job as JobRecord


@dataclass(frozen=True, slots=True)
class _QueueOnly:
    """Enough of a job for ``_notify``: the queue whose idle workers to wake."""

    queue_name: str


class DatabaseControls(StoreBackend):
    """Act on one job (cancel it, run it now, read its progress) or on a whole queue."""

    if TYPE_CHECKING:  # what ``DatabaseBackend`` has
        database: str
        worker_store: Store

        @property
        def vendor(self) -> str: ...

        def _notify[T](self, count: T, jobs: Iterable[JobRecord] | None = None) -> T: ...

    def cancel(self, result_id: str) -> bool:
        return transitions.cancel(self.worker_store, self._key(result_id))

    def request_cancel(self, result_id: str) -> bool:
        return transitions.request_cancel(self.worker_store, self._key(result_id))

    def run_now(self, result_ids: Collection[str]) -> int:
        field, conn = Job._meta.get_field("uuid"), connections[self.worker_store.using]
        keys = []
        for result_id in result_ids:
            try:
                keys.append(field.get_db_prep_value(uuid.UUID(str(result_id)), conn))
            except ValueError:
                continue  # not a result id: no job has it
        return self._notify(transitions.run_now(self.worker_store, keys) if keys else 0)

    def cancels(self, deliveries: Collection[tuple[int, str]]) -> set[tuple[int, str]]:
        return transitions.cancels(self.worker_store, list(deliveries))

    def report_progress(self, job: JobRecord, progress: dict[str, Any]) -> bool:
        return transitions.report_progress(self.worker_store, job, progress)

    def get_progress(self, result_id: str) -> dict[str, Any] | None:
        found = self._values(result_id, "progress")
        return dict(found) if found else None

    def _key(self, result_id: str) -> int:
        return int(self._values(result_id, "pk"))

    def _values(self, result_id: str, field: str) -> Any:
        try:
            return (
                Job.objects.using(self.database)
                .filter(backend_name=self.alias, uuid=uuid.UUID(str(result_id)))
                .values_list(field, flat=True)
                .get()
            )
        except (Job.DoesNotExist, ValueError) as e:
            raise TaskResultDoesNotExist(result_id) from e

    # --- queues -------------------------------------------------------------------------

    def pause_queue(
        self, queue: str, until: datetime | None = None, *, seconds: float | None = None
    ) -> datetime | None:
        return queue_admin.pause(self.worker_store, queue, until, seconds)

    def resume_queue(self, queue: str) -> bool:
        resumed = queue_admin.resume(self.worker_store, queue)
        if resumed and self.vendor == "postgresql":  # idle workers look again at once
            self._notify(1, [_QueueOnly(queue)])  # type: ignore[list-item]
        return resumed

    def paused_queues(self) -> dict[str, datetime | None]:
        return queue_admin.paused(self.worker_store)

    def clear_queue(self, queue: str) -> int:
        return queue_admin.clear(self.worker_store, queue)

    def remove_duplicates(self, queue: str) -> int:
        return queue_admin.remove_duplicates(self.worker_store, queue)
