"""The claim loop in this process: signals, outcomes, graceful hand-back, recycling."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.dispatch import Signal
from django.tasks import TaskResultStatus
from django.tasks.signals import task_finished, task_started

import conveyor
from conveyor.backends.database import DatabaseBackend
from conveyor.records import QueueSelector
from conveyor.runtime.channel import Claiming, Slots
from conveyor.runtime.loop import EXIT_DONE, EXIT_RECYCLE, EXIT_STOPPED, Loop, WorkerConfig
from conveyor.runtime.processes import Processes
from tests.helpers import job, on
from tests.testapp import tasks


@contextmanager
def receiving(*pairs: tuple[Signal, Callable[..., Any]]) -> Iterator[None]:
    """Connect signal receivers for the duration of a block."""
    for signal, receiver in pairs:
        signal.connect(receiver)
    try:
        yield
    finally:
        for signal, receiver in pairs:
            signal.disconnect(receiver)


def run(backend, **config) -> int:  # type: ignore[no-untyped-def]
    settings = {"worker_id": "test-worker", "queues": QueueSelector(), "until_done": True, **config}
    return Loop(backend, WorkerConfig(**settings)).run()


def test_started_and_finished_signals_come_from_the_backend_class(backend, backend_alias):
    seen: list[tuple[str, type, str, str]] = []

    def on_started(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(("started", sender, task_result.id, task_result.status))

    def on_finished(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(("finished", sender, task_result.id, task_result.status))
        if task_result.status == TaskResultStatus.SUCCESSFUL:
            assert task_result.return_value == 5
            assert task_result.finished_at is not None
        else:
            assert task_result.errors[-1].exception_class is ValueError

    ok = on(tasks.add, backend_alias).enqueue(2, 3)
    bad = on(tasks.explode, backend_alias).enqueue("no")
    with receiving((task_started, on_started), (task_finished, on_finished)):
        assert run(backend) == EXIT_DONE

    assert ("started", DatabaseBackend, ok.id, TaskResultStatus.RUNNING) in seen
    assert ("finished", DatabaseBackend, ok.id, TaskResultStatus.SUCCESSFUL) in seen
    assert ("finished", DatabaseBackend, bad.id, TaskResultStatus.FAILED) in seen
    assert len(seen) == 4


def test_every_result_field_is_filled(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(20, 22)
    run(backend, threads=2)
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 42
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.last_attempted_at == result.started_at
    assert result.worker_ids == ["test-worker"] and result.errors == []


def test_a_stop_hands_back_claimed_jobs_that_never_started(backend, backend_alias):
    results = conveyor.bulk_enqueue(on(tasks.noop, backend_alias), [() for _ in range(5)])
    claimed = backend.claim("test-worker", QueueSelector(), 5)
    loop = Loop(backend, WorkerConfig(worker_id="test-worker", queues=QueueSelector()))
    loop._hold(claimed)
    loop.request_stop()
    assert loop.run() == EXIT_STOPPED
    for result in results:
        row = job(result)
        assert row.status == TaskResultStatus.READY and row.attempts == 0


def test_max_tasks_recycles(backend, backend_alias):
    conveyor.bulk_enqueue(on(tasks.noop, backend_alias), [() for _ in range(5)])
    assert run(backend, max_tasks=3, until_done=False) == EXIT_RECYCLE
    assert backend.stats().successful == 3 and backend.stats().ready == 2


def test_an_idle_worker_stops_on_request(backend):
    loop = Loop(backend, WorkerConfig(worker_id="idle", queues=QueueSelector()))
    threading.Timer(0.3, loop.request_stop).start()
    assert loop.run() == EXIT_STOPPED


def test_a_task_calling_sys_exit_fails_and_the_worker_goes_on(backend, backend_alias):
    exited = on(tasks.exits, backend_alias).enqueue(3)
    after = on(tasks.add, backend_alias).enqueue(1, 1)
    assert run(backend) == EXIT_DONE
    exited.refresh()
    assert exited.status == TaskResultStatus.FAILED
    assert exited.errors[0].exception_class_path == "builtins.SystemExit"
    after.refresh()
    assert after.return_value == 2


def test_failing_signal_receivers_change_no_outcome(backend, backend_alias):
    def broken(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("receiver bug")

    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(3)]
    with receiving((task_started, broken), (task_finished, broken)):
        assert run(backend) == EXIT_DONE
    for i, result in enumerate(results):
        result.refresh()
        assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 2 * i


def sibling_loop(backend, claiming):  # type: ignore[no-untyped-def]
    slots = Slots(multiprocessing.get_context(), 4, claiming=claiming)
    loop = Loop(backend, WorkerConfig(worker_id="test-worker", queues=QueueSelector()), slots)
    loop.idle.open()
    return loop


def woken_by(loop: Loop, enqueue: Callable[[], Any]) -> Any:
    """Let ``loop`` find nothing and wait idle until ``enqueue()``, run meanwhile, wakes it."""
    found: list[Any] = []
    timer = threading.Timer(0.2, lambda: found.append(enqueue()))
    timer.start()
    loop._step()  # nothing to claim: it waits, until the enqueue's commit wakes it
    timer.join()
    assert loop.idle.woke and loop.threads.started == 0
    return found[0]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_woken_process_lets_a_siblings_claim_end_first(backend, backend_alias):
    # Woken by the same job as a sibling that is claiming it, an idle process waits for
    # that claim to end instead of queueing behind it for SQLite's write lock; then it
    # looks, and takes what is there.
    claiming = Claiming(multiprocessing.get_context())
    loop = sibling_loop(backend, claiming)
    try:
        result = woken_by(loop, on(tasks.noop, backend_alias).enqueue)
        claiming.begin(os.getpid() + 1)
        loop._step()
        assert loop.threads.started == 0
        result.refresh()
        assert result.status == TaskResultStatus.READY
        claiming.end(os.getpid() + 1)
        loop._step()
        assert loop.threads.started == 1
    finally:
        loop._close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_woken_process_waits_for_siblings_once_however_long_they_claim(backend, backend_alias):
    # Siblings whose claims overlap keep the mark fresh: the woken process waits once,
    # briefly, and then claims anyway.
    claiming = Claiming(multiprocessing.get_context())
    loop = sibling_loop(backend, claiming)
    try:
        woken_by(loop, on(tasks.noop, backend_alias).enqueue)
        claiming.begin(os.getpid() + 1)
        began = time.monotonic()
        loop._step()  # waits briefly
        loop._step()  # claims, the mark fresh as ever
        assert loop.threads.started == 1
        assert time.monotonic() - began < 0.5
    finally:
        loop._close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_process_between_two_jobs_claims_without_waiting_for_siblings(backend, backend_alias):
    # Only a process just woken from an idle wait holds back: one that has run a job and
    # looks for the next (in a drain) claims at once, a sibling's claim under way or not.
    claiming = Claiming(multiprocessing.get_context())
    loop = sibling_loop(backend, claiming)
    try:
        conveyor.bulk_enqueue(on(tasks.noop, backend_alias), [(), ()])
        loop._step()  # claims the first (it was not woken: it had not waited) and runs it
        assert loop.threads.started == 1
        claiming.begin(os.getpid() + 1)
        loop._step()  # saves the first, claims and runs the second
        assert loop.threads.started == 2
    finally:
        loop._close()


def test_each_pool_shares_one_claim_mark_where_claims_queue_up(backend, engine):
    processes = Processes(backend, None, "host", None, None, wake=-1, stopping=lambda: False)  # type: ignore[arg-type]
    first, again, other = processes._claiming(0), processes._claiming(0), processes._claiming(1)
    if engine == "sqlite":  # one write lock for the whole database
        assert first is not None and again is first and other is not None and other is not first
    else:  # row locks: claims of siblings do not queue up behind each other
        assert first is None and other is None
