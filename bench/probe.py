"""What a prune costs everyone else: a writer that times itself, and timed write transactions.

``Writer`` is a thread on its own database connection that, every 5 ms, enqueues a job,
claims one and completes it, timing each statement: the longest any of them took while a
prune ran is how long a real producer or worker would have waited. ``timed_transactions``
times every write transaction the calling thread opens (inside Conveyor's ``prune``: one per
batch, its DELETE and COMMIT), from the moment the transaction holds its lock to the end of
its commit; ``timed_deletes`` times the DELETE statements alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.db import connection, connections
from django.utils import timezone

INTERVAL = 0.005  # seconds between the writer's rounds
PROBE_WORKER = "bench-probe"


class Writer(threading.Thread):
    """Enqueue, claim and complete one job every ``INTERVAL``; time each of the three."""

    def __init__(self) -> None:
        super().__init__(name="bench-writer", daemon=True)
        self.stopping = threading.Event()
        self.phase = "before"
        self.samples: list[tuple[str, str, float]] = []  # (phase, operation, seconds)
        self.error: BaseException | None = None

    def run(self) -> None:
        from django.tasks import task_backends

        from bench.app.tasks import noop_conveyor
        from conveyor.records import QueueSelector

        backend = task_backends["conveyor"]
        claimed: list[Any] = []
        operations: list[tuple[str, Callable[[], Any]]] = [
            ("enqueue", lambda: noop_conveyor.enqueue(-1)),
            ("claim", lambda: claimed.extend(backend.claim(PROBE_WORKER, QueueSelector(), 1))),
            ("complete", lambda: backend.complete([success(job) for job in claimed])),
        ]
        try:
            while not self.stopping.is_set():
                claimed.clear()
                for name, operation in operations:
                    self._time(name, operation)
                self.stopping.wait(INTERVAL)
        except BaseException as e:  # reported by the client, which then fails
            self.error = e
        finally:
            connections.close_all()  # this thread's own connections

    def _time(self, name: str, operation: Callable[[], Any]) -> None:
        started = time.perf_counter()
        operation()
        self.samples.append((self.phase, name, time.perf_counter() - started))

    def seconds(self, phase: str) -> list[float]:
        """Every sample of ``phase`` (all operations), in seconds."""
        return [seconds for p, _, seconds in self.samples if p == phase]

    def longest(self, phase: str) -> dict[str, float]:
        """The longest sample of each operation in ``phase``, in seconds."""
        found: dict[str, float] = {}
        for p, name, seconds in self.samples:
            if p == phase:
                found[name] = max(seconds, found.get(name, 0.0))
        return found

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


def success(job: Any) -> tuple[Any, ...]:
    """A ``Success`` of ``job`` returning None: ``(job, Outcome)``, or before the ``Outcome``
    record (commit d91b74c and earlier) ``(job, return value, finished_at)``."""
    from conveyor import records

    now = timezone.now()
    if len(records.Success.__args__) == 2:  # type: ignore[attr-defined]
        return (job, records.Outcome(started_at=now, finished_at=now))  # type: ignore[attr-defined]
    return (job, None, now)


@contextlib.contextmanager
def timed_transactions(holds: list[float]) -> Iterator[None]:
    """Append to ``holds`` how long each write transaction of this thread held its lock."""
    from conveyor.backends.database.dialects import dialect_for

    cls: Any = type(dialect_for(connection))
    own = "write_transaction" in vars(cls)
    original = cls.write_transaction
    me = threading.get_ident()

    @contextlib.contextmanager
    def timed(self: Any) -> Iterator[None]:
        with original(self):
            started = time.perf_counter()  # after BEGIN: on SQLite, the lock is held
            yield
        if threading.get_ident() == me:
            holds.append(time.perf_counter() - started)

    cls.write_transaction = timed
    try:
        yield
    finally:
        if own:
            cls.write_transaction = original
        else:
            del cls.write_transaction  # inherited again


@contextlib.contextmanager
def timed_deletes(times: list[float]) -> Iterator[None]:
    """Append to ``times`` how long each DELETE statement of this thread's connection took."""

    def timed(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, *args)
        finally:
            if sql.lstrip().upper().startswith("DELETE"):
                times.append(time.perf_counter() - started)

    with connection.execute_wrapper(timed):
        yield
