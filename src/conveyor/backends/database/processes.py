"""The database backend across processes: wake-ups, forks and the worker's own connection."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from django.db import connections, transaction

from conveyor.backends.base import StoreBackend, Waiter
from conveyor.backends.database import transitions
from conveyor.backends.database.models import Job

if TYPE_CHECKING:
    from conveyor.backends.database.store import Store
    from conveyor.backends.database.waiters import FileChangeWaiter
    from conveyor.records import Job as JobRecord
    from conveyor.records import QueueSelector


class DatabaseProcesses(StoreBackend):
    """Wake idle workers and waiting callers; keep connections apart across a fork."""

    if TYPE_CHECKING:  # what ``DatabaseBackend`` has
        database: str
        store: Store
        worker_store: Store

        @property
        def channel(self) -> str: ...

        @property
        def vendor(self) -> str: ...

    # The SQLite waiter reading data_version on the worker's own connection, told of the
    # writes by which this process makes jobs ready (its data_version does not show them).
    own_waiter: FileChangeWaiter | None = None

    @property
    def supports_wakeup(self) -> bool:  # type: ignore[override]
        if self.vendor == "postgresql":  # LISTEN/NOTIFY needs psycopg 3 (conveyor.W004)
            from conveyor.backends.database.waiters import psycopg_installed

            return psycopg_installed()
        return self._sqlite_file() is not None

    @property
    def claims_queue_up(self) -> bool:  # type: ignore[override]
        return self.vendor == "sqlite"

    def _sqlite_file(self) -> str | None:
        conn = connections[self.database]
        if conn.vendor != "sqlite" or conn.is_in_memory_db():  # type: ignore[attr-defined]
            return None
        return str(conn.settings_dict["NAME"])

    # --- wake-ups -----------------------------------------------------------------------

    def _notify[T](self, count: T, jobs: Iterable[JobRecord] | None = None) -> T:
        """Wake idle workers after jobs were made ready again; return ``count``.

        The payload names the queue, so only workers serving it wake; without ``jobs``
        (queues unknown) it is empty, and every idle worker wakes.
        """
        if count:
            self._poke_own()
        if not count or self.vendor != "postgresql":
            return count
        names = sorted({job.queue_name for job in jobs}) if jobs is not None else [""]
        if names:
            calls = ", ".join(["pg_notify(%s, %s)"] * len(names))
            with connections[self.worker_store.using].cursor() as cursor:
                cursor.execute(
                    f"SELECT {calls}", [p for name in names for p in (self.channel, name)]
                )
        return count

    def await_job(self, result_id: str) -> None:
        if self.vendor == "postgresql":
            Job.objects.using(self.database).filter(
                backend_name=self.alias, uuid=uuid.UUID(str(result_id)), awaited=False
            ).update(awaited=True)

    def result_waiter(self) -> Waiter:
        if self.vendor == "postgresql":
            from conveyor.backends.database import waiters

            if waiters.psycopg_installed():
                params = connections[self.database].get_connection_params()
                channel = transitions.done_channel(self.store)
                return waiters.NotifyWaiter(params, channel)
            return Waiter()
        if (path := self._sqlite_file()) is not None:
            from conveyor.backends.database.waiters import FileChangeWaiter

            return FileChangeWaiter(path)
        return Waiter()

    def waiter(self, queues: QueueSelector) -> Waiter:
        if self.vendor == "postgresql":
            from conveyor.backends.database import waiters

            if not waiters.psycopg_installed():
                return waiters.polling_waiter(self.alias, self.database)
            return waiters.NotifyWaiter(
                connections[self.database].get_connection_params(),
                self.channel,
                queues,
                retry_every=self.conveyor_options.poll_interval,
            )
        if (path := self._sqlite_file()) is not None:
            from conveyor.backends.database.waiters import FileChangeWaiter

            # A worker process's claims and saves go through its private connection:
            # reading data_version there, its own commits wake nobody.
            own = self.worker_store.using
            waiter = FileChangeWaiter(path, own=own if own != self.store.using else None)
            if waiter.own is not None:
                self.own_waiter = waiter
            return waiter
        return Waiter()

    def _poke_own(self) -> None:
        """This process wrote jobs ready on its own connection, whose data_version does not
        show its own writes: its next idle wait ends at once (SQLite)."""
        if self.own_waiter is not None:
            self.own_waiter.poke()

    # --- process life -------------------------------------------------------------------

    def before_fork(self) -> None:
        """A forked child must not share the parent's database sockets, pooled ones included."""
        for conn in connections.all(initialized_only=True):
            conn.close()
            if conn.settings_dict.get("OPTIONS", {}).get("pool") and hasattr(conn, "close_pool"):
                conn.close_pool()

    def after_fork(self) -> None:
        """Keep the worker's bookkeeping on a private connection in a worker process.

        Task code shares the thread's connection to ``DATABASE``: a raw ``BEGIN``, a
        ``SET search_path`` or ``SET ROLE`` there must not reach claims and saves. Jobs
        that tasks enqueue still use that connection, so they join the task's transaction.
        """
        private = f"conveyor_worker_{self.database}"
        if private not in connections.settings:
            connections.settings[private] = copy.deepcopy(connections.settings[self.database])
        self.worker_store = dataclasses.replace(self.store, using=private)

    def reading(self) -> AbstractContextManager[object]:
        using = self.worker_store.using
        if connections[using].in_atomic_block:
            return transaction.atomic(using=using)  # a savepoint: a failed read rolls back to it
        return nullcontext()

    def close(self) -> None:
        """Close the worker's private connection; one it shares with its caller stays open."""
        if self.worker_store is not self.store:
            connections[self.worker_store.using].close()
