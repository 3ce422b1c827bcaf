"""A woken worker is never left asleep by its own doings.

On SQLite a worker process reads whether another connection committed on its own
bookkeeping connection, so that its claims and saves do not wake it. These are the cases
that must wake it all the same: jobs its own writes make ready (a snooze or retry with no
delay, a schedule's run started from a task), and commits while a task closed and reopened
that connection.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.tasks import TaskResultStatus, task_backends
from django.utils import timezone

import conveyor
from conveyor import schedules
from tests.helpers import Worker, job, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance

QUIET = {"LEASE": 30.0}  # no heartbeat (a commit) to wake an idle worker by chance
SOON = 1.0  # seconds: a worker left asleep would take IDLE_WAKEUP_WAIT (5 s)


def succeeded(result) -> bool:  # type: ignore[no-untyped-def]
    return job(result).status == TaskResultStatus.SUCCESSFUL


@pytest.mark.parametrize("threads", ["1", "4"])
def test_jobs_a_worker_makes_ready_again_are_taken_at_once(backend_alias, tmp_path: Path, threads):
    took = []
    again = on(tasks.asks_to_retry, backend_alias, retries=2)
    with Worker(backend_alias, "--processes", "1", "--threads", threads, options=QUIET) as w:
        warm = on(tasks.noop, backend_alias).enqueue()
        wait_for(lambda: succeeded(warm))
        # A snooze of no time, then two retries of no delay (which the task asks for).
        for i, task in enumerate([on(tasks.snoozes, backend_alias), again]):
            time.sleep(0.3)  # the worker is idle again
            began = time.monotonic()
            result = task.enqueue(str(tmp_path / f"tries-{i}"), 0)
            wait_for(lambda: succeeded(result), timeout=20, every=0.005)  # noqa: B023
            took.append(time.monotonic() - began)
        w.signal()
        assert w.wait() == 0, w.output
    assert max(took) < SOON, took


def test_a_task_that_closes_the_connections_leaves_the_worker_awake(backend_alias):
    for _ in range(3):  # the worker's connection has committed before the task closes it
        on(tasks.noop, backend_alias).enqueue()
    closing = on(tasks.closes_connections, backend_alias).enqueue(1.0)
    with Worker(backend_alias, "--processes", "1", options=QUIET) as w:
        wait_for(lambda: job(closing).status == TaskResultStatus.RUNNING, every=0.005)
        time.sleep(0.3)
        began = time.monotonic()
        later = on(tasks.noop, backend_alias).enqueue()  # while the connection is closed
        wait_for(lambda: succeeded(later), timeout=20, every=0.005)
        took = time.monotonic() - began
        w.signal()
        assert w.wait() == 0, w.output
    assert took < 0.7 + SOON, took  # the task ends 0.7 s after the enqueue


@pytest.mark.parametrize("threads", ["1", "4"])
def test_a_schedule_run_started_by_a_task_is_taken_at_once(backend_alias, threads):
    later = timezone.now() + timedelta(days=1)
    schedules.create("hourly-noop", tasks.noop, every=3600, start=later, backend=backend_alias)
    with Worker(backend_alias, "--processes", "1", "--threads", threads, options=QUIET) as w:
        warm = on(tasks.noop, backend_alias).enqueue()
        wait_for(lambda: succeeded(warm))
        time.sleep(0.3)  # the worker is idle again
        began = time.monotonic()
        starter = on(tasks.runs_schedule, backend_alias).enqueue("hourly-noop", backend_alias)
        wait_for(lambda: succeeded(starter), every=0.005)
        made = schedules.get("hourly-noop", backend=backend_alias).last_result_id
        run = task_backends[backend_alias].get_result(made)
        wait_for(lambda: succeeded(run), timeout=20, every=0.005)
        took = time.monotonic() - began
        w.signal()
        assert w.wait() == 0, w.output
    assert took < SOON, took


def test_idle_sibling_processes_take_each_job_once_and_at_once(backend_alias, tmp_path: Path):
    # Four idle processes are woken together by each new job (on SQLite they then let a
    # sibling's claim end before their own): every job is still taken at once, by one of
    # them, and run once; and so is each of a burst that wakes them all with work for all.
    log = tmp_path / "runs.log"
    task = on(tasks.log_line, backend_alias)
    with Worker(backend_alias, "--processes", "4", options=QUIET) as w:
        warm = task.enqueue(str(log), "warm")
        wait_for(lambda: succeeded(warm))
        took = []
        for i in range(10):
            time.sleep(0.1)  # every process is idle again
            began = time.monotonic()
            result = task.enqueue(str(log), f"one-{i}")
            wait_for(lambda: succeeded(result), timeout=20, every=0.005)  # noqa: B023
            took.append(time.monotonic() - began)
        time.sleep(0.1)
        burst = conveyor.bulk_enqueue(task, [(str(log), f"burst-{i}") for i in range(40)])
        wait_for(lambda: all(succeeded(r) for r in burst), timeout=20)
        w.signal()
        assert w.wait() == 0, w.output
    assert max(took) < SOON, took
    started = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
    expected = ["warm", *(f"one-{i}" for i in range(10)), *(f"burst-{i}" for i in range(40))]
    assert sorted(started) == sorted(expected)  # each job ran, and ran once
