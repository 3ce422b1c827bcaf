"""The in-process worker: the worker's loop in the caller's thread, for tests and scripts."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from unittest import skipUnless

import pytest
from django.conf import settings
from django.db import connections
from django.tasks import TaskResultStatus, task, task_backends
from django.tasks.exceptions import TaskResultDoesNotExist
from django.tasks.signals import task_finished, task_started
from django.test import TestCase, override_settings
from django.utils import timezone

from conveyor.records import QueueSelector
from conveyor.runtime.channel import Slots
from conveyor.runtime.inprocess import EXIT_OK, InProcessWorker, held
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.helpers import job, lines, on, wait_for
from tests.testapp import tasks


@pytest.fixture
def memory() -> Iterator[str]:
    """The in-process store, empty before and after the test."""
    task_backends["memory"].clear()  # type: ignore[attr-defined]
    yield "memory"
    task_backends["memory"].clear()  # type: ignore[attr-defined]


class Received:
    """The task signals sent during a block: (signal, sender, result id, status)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, type, str, str]] = []

    def started(self, sender: type, task_result: Any, **kwargs: Any) -> None:
        self.seen.append(("started", sender, task_result.id, task_result.status))

    def finished(self, sender: type, task_result: Any, **kwargs: Any) -> None:
        self.seen.append(("finished", sender, task_result.id, task_result.status))

    def __enter__(self) -> Received:
        task_started.connect(self.started)
        task_finished.connect(self.finished)
        return self

    def __exit__(self, *exc: object) -> None:
        task_started.disconnect(self.started)
        task_finished.disconnect(self.finished)


# --- inside a TestCase: the test's transaction is never committed ------------------------


def seen_elsewhere(alias: str, result_id: str) -> bool:
    """Say whether another thread, on its own connection, finds the job."""
    found: list[bool] = []

    def look() -> None:
        try:
            task_backends[alias].get_result(result_id)
            found.append(True)
        except TaskResultDoesNotExist:
            found.append(False)
        finally:
            connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(timeout=30)
    return found == [True]


class InATestCase:
    """``run_until_done`` in a plain ``TestCase`` on one database engine."""

    alias: ClassVar[str]

    def test_runs_uncommitted_jobs_on_the_tests_connection(self) -> None:
        backend = task_backends[self.alias]
        connection = connections[backend.database]  # type: ignore[attr-defined]
        ok = on(tasks.add, self.alias).enqueue(2, 3)
        bad = on(tasks.explode, self.alias).enqueue("no")
        assert connection.in_atomic_block
        with Received() as received:
            summary = run_until_done(self.alias)

        assert summary == RunSummary(succeeded=1, failed=1)
        assert summary.ran == 2
        ok.refresh()
        assert (ok.status, ok.return_value) == (TaskResultStatus.SUCCESSFUL, 5)
        bad.refresh()
        assert bad.status == TaskResultStatus.FAILED
        assert "ValueError: no" in bad.errors[0].traceback
        sender = type(backend)
        assert Counter(received.seen) == Counter(
            [
                ("started", sender, ok.id, TaskResultStatus.RUNNING),
                ("finished", sender, ok.id, TaskResultStatus.SUCCESSFUL),
                ("started", sender, bad.id, TaskResultStatus.RUNNING),
                ("finished", sender, bad.id, TaskResultStatus.FAILED),
            ],
        )
        # The test's connection is still open and inside its transaction, and the worker
        # was registered (and ended) inside that transaction: nobody else sees any of it.
        assert connection.in_atomic_block and connection.is_usable()
        assert not seen_elsewhere(self.alias, ok.id)
        [worker] = backend.workers(alive=False)  # type: ignore[attr-defined]
        assert (worker.kind, worker.ended) == ("process", "stopped")

    def test_jobs_enqueued_by_tasks_run_too_and_queues_narrow_the_run(self) -> None:
        on(tasks.fan_out, self.alias).enqueue(3, self.alias)
        email = on(tasks.send_email, self.alias).enqueue("a@example.com")
        assert run_until_done(self.alias, queues=["default"]).succeeded == 4
        assert job(email).status == TaskResultStatus.READY
        assert run_until_done(self.alias, queues="emails").succeeded == 1
        assert run_until_done(self.alias).ran == 0

    def test_jobs_scheduled_for_later_wait(self) -> None:
        later = on(tasks.add, self.alias, run_after=timezone.now() + timedelta(hours=1))
        result = later.enqueue(1, 1)
        assert run_until_done(self.alias).ran == 0
        assert job(result).status == TaskResultStatus.READY
        with store_clock() as clock:
            clock.advance(3600)
            assert run_until_done(self.alias).succeeded == 1
        assert job(result).status == TaskResultStatus.SUCCESSFUL
        with pytest.raises(ValueError, match="only moves forward"), store_clock() as clock:
            clock.advance(-1)


class SQLiteTestCase(InATestCase, TestCase):
    alias = "default"
    databases = {"default"}

    def test_unknown_queues_are_refused(self) -> None:
        with self.assertRaisesMessage(ValueError, "Unknown queue(s) 'nowhere' for backend"):
            run_until_done(queues=["nowhere"])

    def test_the_memory_backend_in_a_test_case(self) -> None:
        task_backends["memory"].clear()  # type: ignore[attr-defined]
        self.addCleanup(task_backends["memory"].clear)  # type: ignore[attr-defined]
        results = [on(tasks.add, "memory").enqueue(i, i) for i in range(3)]
        with Received() as received:
            assert run_until_done("memory") == RunSummary(succeeded=3)
        assert [job(r).return_value for r in results] == [0, 2, 4]
        assert len(received.seen) == 6


@skipUnless("postgres" in settings.DATABASES, "no postgres server on this machine")
class PostgresTestCase(InATestCase, TestCase):
    alias = "postgres"
    databases = {"postgres"}


@skipUnless("mysql" in settings.DATABASES, "no mysql server on this machine")
class MySQLTestCase(InATestCase, TestCase):
    alias = "mysql"
    databases = {"mysql"}


# --- outside any transaction --------------------------------------------------------------


def test_memory_backend_outside_any_transaction(memory: str) -> None:
    results = [on(tasks.add, memory).enqueue(i, 1) for i in range(5)]
    failing = on(tasks.explode, memory).enqueue("boom")
    with Received() as received:
        assert run_until_done(memory) == RunSummary(succeeded=5, failed=1)
    assert [job(r).return_value for r in results] == [1, 2, 3, 4, 5]
    assert job(failing).status == TaskResultStatus.FAILED
    assert {(name, status) for name, _, _, status in received.seen} == {
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.SUCCESSFUL),
        ("finished", TaskResultStatus.FAILED),
    }
    [worker] = task_backends[memory].workers(alive=False)  # type: ignore[attr-defined]
    assert worker.ended == "stopped" and worker.stopped_at is not None


@pytest.mark.django_db(transaction=True)
def test_database_backend_outside_any_transaction() -> None:
    results = [tasks.add.enqueue(i, i) for i in range(3)]
    assert run_until_done() == RunSummary(succeeded=3)
    assert [job(r).return_value for r in results] == [0, 2, 4]
    assert task_backends["default"].workers() == []  # type: ignore[attr-defined]


def test_max_tasks_stops_after_that_many(memory: str) -> None:
    for i in range(4):
        on(tasks.add, memory).enqueue(i, i)
    worker = InProcessWorker(memory, QueueSelector(), max_tasks=3)
    assert worker.run() == EXIT_OK
    assert worker.summary.succeeded == 3
    assert task_backends[memory].stats().ready == 1  # type: ignore[attr-defined]


def test_without_until_done_it_runs_until_asked_to_stop(memory: str) -> None:
    worker = InProcessWorker(memory, QueueSelector(), until_done=False)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()))
    thread.start()
    try:
        result = on(tasks.add, memory).enqueue(20, 22)
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL)
    finally:
        worker.request_stop()
        thread.join(timeout=10)
    assert codes == [EXIT_OK] and worker.summary.succeeded == 1
    assert task_backends[memory].workers() == []  # type: ignore[attr-defined]


def test_a_worker_runs_again_under_a_new_id(memory: str) -> None:
    worker = InProcessWorker(memory, QueueSelector())
    on(tasks.add, memory).enqueue(1, 1)
    assert worker.run() == EXIT_OK
    first = worker.worker_id
    on(tasks.add, memory).enqueue(2, 2)
    assert worker.run() == EXIT_OK and worker.summary.succeeded == 1
    assert worker.worker_id != first
    assert len(task_backends[memory].workers(alive=False)) == 2  # type: ignore[attr-defined]


def test_a_stop_requested_before_the_run_runs_nothing(memory: str) -> None:
    on(tasks.add, memory).enqueue(1, 1)
    worker = InProcessWorker(memory, QueueSelector())
    worker.request_stop()
    assert worker.run() == EXIT_OK and worker.summary.ran == 0


@task()
def interrupted() -> None:
    """Ctrl-C arriving while the task runs."""
    raise KeyboardInterrupt


def test_an_interrupt_stops_the_run_and_puts_the_job_back(memory: str) -> None:
    stuck = on(interrupted, memory).enqueue()
    after = on(tasks.add, memory).enqueue(1, 1)
    with pytest.raises(KeyboardInterrupt):
        run_until_done(memory)
    row = job(stuck)
    assert row.status == TaskResultStatus.READY  # back in line, not failed
    assert "the in-process worker interrupted" in row.errors[-1].traceback
    assert job(after).status == TaskResultStatus.READY
    [worker] = task_backends[memory].workers(alive=False)  # type: ignore[attr-defined]
    assert worker.ended == "interrupted"


# --- the lease keeper ---------------------------------------------------------------------

SHORT_LEASE = {
    "BACKEND": "conveyor.backends.memory.MemoryBackend",
    "QUEUES": [],
    "OPTIONS": {"LEASE": 0.3, "POLL_INTERVAL": 0.05},
}


def test_held_reads_the_slots_as_heartbeat_takes_them(memory: str) -> None:
    import multiprocessing

    on(tasks.add, memory).enqueue(1, 1)
    on(tasks.add, memory).enqueue(2, 2)
    first, second = task_backends[memory].claim("w", QueueSelector(), 2)  # type: ignore[attr-defined]
    slots = Slots(multiprocessing.get_context(), 2)
    slots.start(slots.hold(first))
    slots.hold(second)
    by_key = {key: (token, started) for key, token, started in held(slots)}
    assert by_key[first.key][0] == first.delivery and by_key[first.key][1] is not None
    assert by_key[second.key] == (second.delivery, None)


def _long_task_under_a_short_lease(tmp_path: Path, alias: str, first_job: bool) -> None:
    """Run a task of four leases in-process while a delivery nobody renews lapses."""
    log = tmp_path / "log"
    with override_settings(TASKS={**settings.TASKS, alias: SHORT_LEASE}):
        backend = task_backends[alias]
        backend.clear()  # type: ignore[attr-defined]
        if not first_job:
            on(tasks.noop, alias).enqueue()
            assert run_until_done(alias).succeeded == 1
        long = on(tasks.log_line, alias).enqueue(str(log), "long", sleep=1.2)
        worker = InProcessWorker(alias, QueueSelector())
        thread = threading.Thread(target=worker.run)
        thread.start()
        try:
            wait_for(lambda: lines(log))
            # A delivery nobody renews, as a control: the lease is short enough to lapse.
            on(tasks.add, alias).enqueue(1, 1)
            backend.claim("nobody", QueueSelector(), 1)  # type: ignore[attr-defined]
            time.sleep(0.8)  # more than two leases
            assert backend.recover() == 1  # type: ignore[attr-defined]
            assert backend.reclaim([worker.worker_id]) == []  # type: ignore[attr-defined]
            [running] = backend.workers()  # type: ignore[attr-defined]
            assert running.id == worker.worker_id
            assert running.last_beat_at > timezone.now() - timedelta(seconds=0.5)
        finally:
            thread.join(timeout=10)
        assert worker.summary == RunSummary(succeeded=2)  # the long task and the recovered one
        assert job(long).worker_ids == [worker.worker_id]
        backend.clear()  # type: ignore[attr-defined]


def test_the_lease_keeper_renews_a_long_task_and_the_workers_row(tmp_path: Path) -> None:
    _long_task_under_a_short_lease(tmp_path, "short", first_job=False)


def test_the_lease_keeper_renews_the_first_job_of_a_memory_store(tmp_path: Path) -> None:
    # An alias no other test uses: its store is new, so this job is its first.
    _long_task_under_a_short_lease(tmp_path, "short-first", first_job=True)


# --- what Django logs -----------------------------------------------------------------------

STORES = ["memory", pytest.param("default", marks=pytest.mark.django_db(transaction=True))]


def logged(caplog: pytest.LogCaptureFixture, result: Any) -> list[tuple[int, str, Any]]:
    """The ``django.tasks`` records about one result: level, message, exception class."""
    return [
        (
            r.levelno,
            r.getMessage().replace(result.id, "ID").replace(f"={result.backend}", "=BACKEND"),
            r.exc_info[0] if r.exc_info else None,
        )
        for r in caplog.records
        if r.name == "django.tasks" and result.id in r.getMessage()
    ]


@pytest.mark.parametrize("alias", STORES)
def test_the_worker_logs_what_djangos_backends_log(
    alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    task_backends["memory"].clear()  # type: ignore[attr-defined]
    caplog.set_level(logging.DEBUG, logger="django.tasks")
    ok = on(tasks.add, alias).enqueue(1, 2)
    bad = on(tasks.explode, alias).enqueue("kaboom")
    run_until_done(alias)

    add, explode = tasks.add.module_path, tasks.explode.module_path
    assert logged(caplog, ok) == [
        (logging.DEBUG, f"Task id=ID path={add} enqueued backend=BACKEND", None),
        (logging.INFO, f"Task id=ID path={add} state=RUNNING", None),
        (logging.INFO, f"Task id=ID path={add} state=SUCCESSFUL", None),
    ]
    assert logged(caplog, bad) == [
        (logging.DEBUG, f"Task id=ID path={explode} enqueued backend=BACKEND", None),
        (logging.INFO, f"Task id=ID path={explode} state=RUNNING", None),
        (logging.ERROR, f"Task id=ID path={explode} state=FAILED", ValueError),
    ]
    assert "Traceback (most recent call last)" in caplog.text
    assert "ValueError: kaboom" in caplog.text

    # Exactly what Django's own ImmediateBackend logs for the same calls.
    immediate_ok = on(tasks.add, "immediate").enqueue(1, 2)
    immediate_bad = on(tasks.explode, "immediate").enqueue("kaboom")
    assert logged(caplog, immediate_ok) == logged(caplog, ok)
    assert logged(caplog, immediate_bad) == logged(caplog, bad)
    task_backends["memory"].clear()  # type: ignore[attr-defined]


def test_a_running_job_cancelled_in_process_is_told_to_stop(memory, tmp_path: Path):
    started = tmp_path / "started"
    result = on(tasks.stops_when_cancelled, memory).enqueue(str(started))
    worker = InProcessWorker(memory, until_done=True)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(started.exists)
        import conveyor

        assert conveyor.cancel(result) == conveyor.CancelOutcome.STOPPING
        wait_for(lambda: job(result).status == TaskResultStatus.FAILED, timeout=5)
    finally:
        thread.join(timeout=40)
    [error] = job(result).errors
    assert error.exception_class_path == "conveyor.exceptions.Cancelled"
