"""The in-process store's controls: cancel a job, run it now, report and read progress."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from django.tasks.exceptions import TaskResultDoesNotExist

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.records import PENDING_STATES, Job, State

if TYPE_CHECKING:
    from conveyor.backends.memory.tables import Tables


class MemoryControls(StoreBackend):
    """Act on one job of the in-process store: cancel it, run it now, follow its progress."""

    if TYPE_CHECKING:
        _tables: Tables  # what ``MemoryBackend`` has

    def cancel(self, result_id: str) -> bool:
        with self._tables.lock:
            row = self._tables.find(result_id)
            if row.state not in PENDING_STATES:
                return False
            row.cancel()
            return True

    def run_now(self, result_ids: Collection[str]) -> int:
        now, moved = clock.now(), 0
        with self._tables.lock:
            for result_id in result_ids:
                try:
                    row = self._tables.find(result_id)
                except TaskResultDoesNotExist:
                    continue
                if row.state is State.SCHEDULED:
                    row.state, row.available_at, row.run_after = State.READY, now, now
                    moved += 1
        return moved

    def request_cancel(self, result_id: str) -> bool:
        with self._tables.lock:
            row = self._tables.find(result_id)
            if row.state is not State.RUNNING:
                return False
            row.cancel_requested = True
            return True

    def cancels(self, deliveries: Collection[tuple[int, str]]) -> set[tuple[int, str]]:
        with self._tables.lock:
            rows = [self._tables.delivered(key, token) for key, token in deliveries]
            return {(row.seq, row.delivery) for row in rows if row and row.cancel_requested}

    def report_progress(self, job: Job, progress: dict[str, Any]) -> bool:
        with self._tables.lock:
            row = self._tables.delivered(job.key, job.delivery)
            if row is None:
                return False
            row.progress = json.loads(json.dumps(progress))
            return True

    def get_progress(self, result_id: str) -> dict[str, Any] | None:
        with self._tables.lock:
            progress = self._tables.find(result_id).progress
            return dict(progress) if progress is not None else None
