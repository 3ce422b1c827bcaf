"""The workers registry: one row per running supervisor and worker process."""

from __future__ import annotations

from conveyor import clock
from conveyor.backends.database.models import Worker
from conveyor.backends.database.store import WORKERS, Store
from conveyor.records import WorkerInfo


def register_worker(store: Store, info: WorkerInfo) -> None:
    d = store.dialect
    fields = (
        "id, backend_name, kind, supervisor, host, pid, queues, threads, started_at, "
        "last_beat_at, ended"
    )
    store.execute(
        f"INSERT INTO {WORKERS} ({fields}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
        f"{d.now()}, '')",
        [
            info.id,
            store.backend,
            info.kind,
            info.supervisor or "",
            info.host,
            info.pid,
            info.queues,
            info.threads,
            store.time(info.started_at or clock.now()),
        ],
    )


def end_worker(store: Store, worker_id: str, ended: str) -> None:
    store.execute(
        f"UPDATE {WORKERS} SET stopped_at = %s, ended = %s WHERE id = %s AND stopped_at IS NULL",
        [store.time(clock.now()), ended, worker_id],
    )


def workers(store: Store, alive: bool) -> list[WorkerInfo]:
    rows = Worker.objects.using(store.using).filter(backend_name=store.backend)
    if alive:
        rows = rows.filter(stopped_at__isnull=True)
    return [
        WorkerInfo(
            id=row.id,
            backend=row.backend_name,
            kind=row.kind,
            host=row.host,
            pid=row.pid,
            supervisor=row.supervisor or None,
            queues=row.queues,
            threads=row.threads,
            started_at=row.started_at,
            last_beat_at=row.last_beat_at,
            stopped_at=row.stopped_at,
            ended=row.ended,
        )
        for row in rows.order_by("started_at", "id")
    ]
