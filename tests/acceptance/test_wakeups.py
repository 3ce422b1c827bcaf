"""A real worker on PostgreSQL: woken only for its queues, and back at once after a cut.

The server is watched from a connection to another database (``postgres``), so the
probes add nothing to the test database's transaction count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.tasks import TaskResultStatus

from tests.helpers import Worker, job, on, wait_for
from tests.testapp import tasks

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.parametrize("engine", ["postgres"], indirect=True),
]

QUIET = {"LEASE": 30.0}  # the supervisor beats every 10 s: none within these tests
PICKUP = 0.1  # seconds from enqueue to start that a woken worker must beat


@pytest.fixture
def probe(backend: Any) -> Iterator[Probe]:
    probe = Probe(backend.database)
    try:
        yield probe
    finally:
        probe.close()


class Probe:
    """Read the server's activity and statistics for the test database, from outside it."""

    def __init__(self, alias: str) -> None:
        import psycopg

        db = connections[alias].settings_dict
        self.alias, self.name = alias, db["NAME"]
        self.conn = psycopg.connect(
            host=db["HOST"],
            port=db["PORT"],
            user=db["USER"],
            password=db.get("PASSWORD") or None,
            dbname="postgres",
            autocommit=True,
        )

    def one(self, sql: str, *params: Any) -> Any:
        row = self.conn.execute(sql, [self.name, *params]).fetchone()
        return row[0] if row else None

    def listener(self) -> int | None:
        """The server process holding the worker's LISTEN connection."""
        return self.one(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'"
        )

    def sessions(self) -> int:
        return int(self.one("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"))

    def commits(self) -> int:
        """Committed transactions in the test database, once every session has ended.

        A session reports its counts at most once a second while it runs, and always
        when it ends: only then is the figure complete.
        """
        connections[self.alias].close()
        wait_for(lambda: self.sessions() == 0, timeout=10)
        return int(self.one("SELECT xact_commit FROM pg_stat_database WHERE datname = %s"))

    def terminate(self, pid: int) -> None:
        self.conn.execute("SELECT pg_terminate_backend(%s)", [pid])

    def close(self) -> None:
        self.conn.close()


def test_a_worker_is_not_woken_by_other_queues(backend, backend_alias, probe):
    """Ten enqueues into 'emails' cost a worker serving 'default' next to nothing."""
    quiet = worker_commits(backend, probe, enqueue_emails=False)
    busy = worker_commits(backend, probe, enqueue_emails=True)
    # Not the worker's: the ten INSERTs, and the ten transactions in which the server
    # reads each notification for the listening session (any listener costs those).
    extra = busy - quiet - 20
    print(f"\nworker lifetime: {quiet} transactions idle, {busy} with 10 enqueues: {extra} extra")
    assert extra < 5, (quiet, busy)  # each wake would cost ~3 (stage, claim, next due)


def worker_commits(backend: Any, probe: Probe, *, enqueue_emails: bool) -> int:
    """Transactions in the test database over one worker's life, with or without enqueues.

    The test's own connection is opened either way, so both runs differ only in the
    enqueues into 'emails' and what the worker does about them.
    """
    before = probe.commits()
    with Worker(backend.alias, "--processes", "1", "--queue", "default", options=QUIET) as worker:
        connections[backend.database].ensure_connection()
        wait_for(probe.listener)
        for _ in range(10):
            if enqueue_emails:
                on(tasks.noop, backend.alias, queue_name="emails").enqueue()
            time.sleep(0.1)
        worker.signal()
        assert worker.wait() == 0, worker.output
    return probe.commits() - before


def test_a_cut_listen_connection_is_back_and_work_is_picked_up_at_once(
    backend, backend_alias, probe
):
    with Worker(backend_alias, "--processes", "1", "--queue", "default", options=QUIET) as w:
        first = wait_for(probe.listener)
        probe.terminate(first)
        cut = pickup(backend_alias)  # the worker notices, reconnects, and looks at once
        second = wait_for(lambda: (pid := probe.listener()) not in (None, first) and pid)
        again = pickup(backend_alias)  # ... and is listening again
        w.signal()
        assert w.wait() == 0, w.output
    print(f"\npickup after the cut: {cut * 1000:.1f} ms; later: {again * 1000:.1f} ms")
    assert cut < PICKUP and again < PICKUP
    assert second != first
    assert w.output.count("LISTEN connection on channel conveyor_postgres failed") == 1, w.output
    assert w.output.count("LISTEN connection on channel conveyor_postgres is back.") == 1


def pickup(alias: str) -> float:
    """Enqueue a job into 'default'; seconds until a worker started it."""
    result = on(tasks.add, alias).enqueue(1, 2)
    wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL, timeout=10)
    done = job(result)
    return float((done.started_at - done.enqueued_at).total_seconds())
