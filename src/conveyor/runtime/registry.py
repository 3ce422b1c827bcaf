"""A supervisor's rows in the workers registry: one for itself, one per worker process.

Each row says where a worker runs (host, pid), which queues it serves and with how many
threads; a row is ended, with how its worker ended, when the worker stops or dies. The
registry only informs people and monitors: a store that cannot be reached is logged and
the supervisor carries on.
"""

from __future__ import annotations

import logging
import socket

from django.db import connections
from django.utils import timezone

from conveyor.backends.base import StoreBackend
from conveyor.records import Pool, QueueSelector, WorkerInfo

logger = logging.getLogger(__name__)


class Registry:
    """Register and end the rows of one supervisor (``host``) and of its processes."""

    def __init__(
        self, backend: StoreBackend, host: str, pools: tuple[Pool, ...], threads: int
    ) -> None:
        self.backend = backend
        self.host = host
        self.pools = pools
        self.threads = threads
        self.hostname = socket.gethostname()

    def register(
        self, worker_id: str, kind: str, pid: int, queues: QueueSelector | None = None
    ) -> None:
        """Add the row of a worker of this supervisor (``kind`` "supervisor" or "process")."""
        self.backend.register_worker(self.info(worker_id, kind, pid, queues))

    def info(
        self, worker_id: str, kind: str, pid: int, queues: QueueSelector | None = None
    ) -> WorkerInfo:
        """The row of a worker; a supervisor's shows the queues of all its pools."""
        shown = (
            queues.describe()
            if queues is not None
            else " | ".join(pool.queues.describe() for pool in self.pools)
        )
        return WorkerInfo(
            id=worker_id,
            backend=self.backend.alias,
            kind=kind,
            host=self.hostname,
            pid=pid,
            supervisor=None if kind == "supervisor" else self.host,
            queues=shown,
            threads=self.threads,
            started_at=timezone.now(),
        )

    def end(self, worker_id: str, ended: str) -> None:
        """Mark a worker's row stopped, saying how it ended."""
        try:
            self.backend.end_worker(worker_id, ended)
        except Exception as e:
            logger.warning("Could not mark worker %s stopped in the registry (%s).", worker_id, e)
            connections.close_all()
