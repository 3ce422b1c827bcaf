"""The in-process store's queue administration: pauses, clearing, duplicates removed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.records import State

if TYPE_CHECKING:
    from conveyor.backends.memory.rows import Row
    from conveyor.backends.memory.tables import Tables

PENDING = (State.READY, State.SCHEDULED)


def _now() -> datetime:
    return clock.aware(clock.now())


class MemoryQueues(StoreBackend):
    """Pause, resume, clear and deduplicate the in-process store's queues."""

    if TYPE_CHECKING:
        _tables: Tables

    def pause_queue(
        self, queue: str, until: datetime | None = None, *, seconds: float | None = None
    ) -> datetime | None:
        if seconds is not None:
            until = _now() + timedelta(seconds=seconds)
        with self._tables.lock:
            self._tables.pauses[queue] = None if until is None else clock.aware(until)
        return until

    def resume_queue(self, queue: str) -> bool:
        was = queue in self.paused_queues()
        with self._tables.lock:
            self._tables.pauses.pop(queue, None)
        return was

    def paused_queues(self) -> dict[str, datetime | None]:
        now = _now()
        with self._tables.lock:
            return {
                queue: until
                for queue, until in self._tables.pauses.items()
                if until is None or until > now
            }

    def clear_queue(self, queue: str) -> int:
        with self._tables.lock:
            doomed = [row.id for row in self._pending(queue)]
            for key in doomed:
                self._tables.remove(key)
            return len(doomed)

    def remove_duplicates(self, queue: str) -> int:
        with self._tables.lock:
            seen: set[tuple[str, str]] = set()
            doubles = []
            for row in self._pending(queue):
                call = (row.task_path, json.dumps([row.args, row.kwargs], sort_keys=True))
                if call in seen:
                    doubles.append(row.id)
                seen.add(call)
            for key in doubles:
                self._tables.remove(key)
            return len(doubles)

    def _pending(self, queue: str) -> list[Row]:
        rows = [row for row in self._tables.rows(*PENDING) if row.queue_name == queue]
        return sorted(rows, key=lambda row: row.seq)
