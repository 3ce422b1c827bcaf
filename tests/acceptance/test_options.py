"""Task options with real workers: retries, time limits, cancel, stopping per task."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from django.tasks import TaskResultStatus

import conveyor
from tests.helpers import Worker, job, lines, on, wait_for
from tests.testapp import tasks


def test_retries_survive_a_worker_restart(backend_alias, tmp_path: Path):
    flaky = on(tasks.fails_twice, backend_alias).using(retry_backoff=0.3)
    result = flaky.enqueue(str(tmp_path / "tries"))
    with Worker(backend_alias, "--processes", "1") as first:
        wait_for(lambda: len(job(result).errors) == 1)
        first.signal()
        assert first.wait() == 0, first.output
    assert "runs again at" in first.output and "ValueError, retried" in first.output
    assert job(result).status == TaskResultStatus.READY  # waiting for its retry

    with Worker(backend_alias, "--processes", "1") as second:
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL)
        second.signal()
        assert second.wait() == 0, second.output
    done = job(result)
    assert done.attempts == 3 and len(done.errors) == 2 and done.return_value == "done"
    assert (tmp_path / "tries").read_text().count("try") == 3


def test_a_task_past_its_time_limit_is_stopped_and_nothing_else_is_lost(
    backend_alias, tmp_path: Path
):
    log = tmp_path / "log"
    noop = on(tasks.log_line, backend_alias)
    before = conveyor.bulk_enqueue(noop, [(str(log), f"b{i}") for i in range(20)])
    slow = on(tasks.overruns, backend_alias).enqueue(str(log), 30)
    after = conveyor.bulk_enqueue(noop, [(str(log), f"a{i}") for i in range(20)])

    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: job(slow).status == TaskResultStatus.FAILED, timeout=10)
        failed = job(slow)
        for result in [*before, *after]:
            wait_for(lambda r=result: job(r).status == TaskResultStatus.SUCCESSFUL)
        worker.signal()
        assert worker.wait() == 0, worker.output

    [error] = failed.errors
    assert error.exception_class_path == "conveyor.exceptions.TimeLimitExceeded"
    assert "time limit of 0.5s" in error.traceback
    ran = (failed.finished_at - failed.last_attempted_at).total_seconds()
    assert 0.5 <= ran < 1.5, ran  # stopped within a second of its limit
    starts = [line.split()[1] for line in lines(log) if line.startswith("start")]
    assert sorted(s for s in starts if s != "overrun") == sorted(
        [f"b{i}" for i in range(20)] + [f"a{i}" for i in range(20)]
    )
    assert f"Job {slow.id} (tests.testapp.tasks.overruns) failed" in worker.output
    assert "Traceback" not in worker.output


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_time_limits_are_kept_while_many_processes_start(backend_alias, tmp_path: Path):
    # Starting 32 processes takes the supervisor a second or more here; the first ones
    # take the overrunning jobs at once. Each limit is kept between two starts, not once
    # every process is up.
    log = tmp_path / "log"
    slow = conveyor.bulk_enqueue(on(tasks.overruns_soon, backend_alias), [(str(log), 30)] * 4)
    with Worker(backend_alias, "--processes", "32") as worker:
        for result in slow:
            wait_for(lambda r=result: job(r).status == TaskResultStatus.FAILED, timeout=20)
        worker.signal()
        assert worker.wait() == 0, worker.output
    for result in slow:
        failed = job(result)
        assert failed.errors[-1].exception_class_path == "conveyor.exceptions.TimeLimitExceeded"
        ran = (failed.finished_at - failed.last_attempted_at).total_seconds()
        assert 0.2 <= ran < 0.55, (ran, worker.output)  # stopped soon after its 0.2 s limit


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_a_stop_while_many_processes_start_ends_the_starts(backend_alias, tmp_path: Path):
    # SIGTERM while the supervisor is still starting 32 processes: it starts no more, the
    # running task is waited for, and every process it started is gone when it exits.
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "slow", sleep=1.0)
    with Worker(backend_alias, "--processes", "32") as worker:
        wait_for(lambda: lines(log), timeout=20)
        worker.signal()
        assert worker.wait() == 0, worker.output
        with pytest.raises(ProcessLookupError):
            os.killpg(worker.pid, 0)  # nothing of the worker is left
    assert job(result).status == TaskResultStatus.SUCCESSFUL
    assert 0 < worker.output.count("Started worker process") < 32, worker.output


def test_a_time_limit_is_retried_when_the_policy_allows(backend_alias, tmp_path: Path):
    slow = on(tasks.overruns, backend_alias).using(retries=1, retry_backoff=0.1)
    result = slow.enqueue(str(tmp_path / "log"), 30)
    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: job(result).status == TaskResultStatus.FAILED, timeout=10)
        worker.signal()
        assert worker.wait() == 0, worker.output
    failed = job(result)
    assert [e.exception_class_path for e in failed.errors] == [
        "conveyor.exceptions.TimeLimitExceeded"
    ] * 2
    assert failed.attempts == 2
    assert "runs again at" in worker.output


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_soft_time_limit_is_raised_inside_the_task(backend_alias, tmp_path: Path, threads):
    # One thread: the task runs on the process's main thread (a timer signal); two: on
    # worker threads (raised at the thread's next instruction).
    note = tmp_path / "note"
    result = on(tasks.cleans_up, backend_alias).enqueue(str(note))
    with Worker(backend_alias, "--processes", "1", "--threads", threads) as worker:
        wait_for(lambda: job(result).status == TaskResultStatus.FAILED, timeout=10)
        worker.signal()
        assert worker.wait() == 0, worker.output
    failed = job(result)
    assert note.read_text() == "cleaned up"
    [error] = failed.errors
    assert error.exception_class_path == "conveyor.exceptions.SoftTimeLimitExceeded"
    ran = (failed.finished_at - failed.last_attempted_at).total_seconds()
    assert 0.3 <= ran < 1.0, ran


def test_a_task_with_sigkill_on_stop_is_not_waited_for(backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.not_worth_waiting_for, backend_alias).enqueue(str(log))
    other = on(tasks.log_line, backend_alias).enqueue(str(tmp_path / "other"), "x", sleep=1.5)
    with Worker(backend_alias, "--processes", "2") as worker:
        wait_for(lambda: lines(log) and lines(tmp_path / "other"))
        stopping = time.monotonic()
        worker.signal()
        assert worker.wait() == 0, worker.output
        assert time.monotonic() - stopping < 5  # not the task's 30 s
    back = job(result)
    assert back.status == TaskResultStatus.READY  # runs again at the next start
    assert "sigkill_on_stop" in back.errors[-1].traceback
    # A task without the option, in the other process, was waited for.
    assert job(other).status == TaskResultStatus.SUCCESSFUL
    assert "runs again" not in worker.output  # the stop counted nothing


def test_a_running_task_that_checks_stops_when_cancelled(backend_alias, tmp_path: Path):
    started = tmp_path / "started"
    result = on(tasks.stops_when_cancelled, backend_alias).enqueue(str(started))
    neighbour = on(tasks.log_line, backend_alias).enqueue(str(tmp_path / "n"), "x", sleep=1.0)
    with Worker(backend_alias, "--processes", "2") as worker:
        wait_for(started.exists)
        wait_for(lambda: (conveyor.progress(result) or {}).get("done", 0) > 0)
        assert conveyor.progress(result)["total"] == 3000
        asked = time.monotonic()
        assert conveyor.cancel(result) == conveyor.CancelOutcome.STOPPING
        wait_for(lambda: job(result).status == TaskResultStatus.FAILED, timeout=10)
        assert time.monotonic() - asked < 3  # noticed within about a second
        wait_for(lambda: job(neighbour).status == TaskResultStatus.SUCCESSFUL)
        worker.signal()
        assert worker.wait() == 0, worker.output
    done = job(result)
    assert [e.exception_class_path for e in done.errors] == ["conveyor.exceptions.Cancelled"]
    assert "cancelled while it ran" in done.errors[0].traceback


def test_a_task_that_ignores_a_cancel_is_stopped_after_the_grace(backend_alias, tmp_path: Path):
    started = tmp_path / "started"
    result = on(tasks.ignores_cancel, backend_alias).enqueue(str(started))
    with Worker(backend_alias, "--processes", "1", options={"CANCEL_GRACE": 0.5}) as worker:
        wait_for(started.exists)
        assert conveyor.cancel(result) == conveyor.CancelOutcome.STOPPING
        wait_for(lambda: job(result).status == TaskResultStatus.FAILED, timeout=10)
        later = on(tasks.add, backend_alias).enqueue(2, 3)  # the replacement process runs it
        wait_for(lambda: job(later).status == TaskResultStatus.SUCCESSFUL)
        worker.signal()
        assert worker.wait() == 0, worker.output
    [error] = job(result).errors
    assert error.exception_class_path == "conveyor.exceptions.Cancelled"
    assert "did not stop within 0.5s" in error.traceback
    assert f"Job {result.id} (tests.testapp.tasks.ignores_cancel) was cancelled" in worker.output


def test_hooks_of_jobs_the_supervisor_ended_never_hold_it(backend_alias, tmp_path: Path):
    # The first job's time limit is recorded by the supervisor; its slow on_failure hook
    # runs elsewhere, and the second job's limit is still kept on time.
    note = tmp_path / "hook"
    first = on(tasks.overruns_with_a_slow_hook, backend_alias).enqueue(str(note))
    second = on(tasks.overruns, backend_alias).using(timeout=1.0).enqueue(str(tmp_path / "l"), 30)
    with Worker(backend_alias, "--processes", "2") as worker:
        wait_for(lambda: job(second).status == TaskResultStatus.FAILED, timeout=10)
        wait_for(note.exists, timeout=10)
        worker.signal()
        assert worker.wait() == 0, worker.output
    assert job(first).status == TaskResultStatus.FAILED
    done = job(second)
    ran = (done.finished_at - done.last_attempted_at).total_seconds()
    assert 1.0 <= ran < 2.0, ran  # not held up by the 3 s hook
    assert int(note.read_text()) != worker.pid  # not run in the supervisor
