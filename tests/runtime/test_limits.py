"""Soft time limits: raised inside the run they guard, and always that run's outcome."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
from django.tasks import task_backends

from conveyor.runtime.invocation import invoke
from tests.helpers import on
from tests.testapp import tasks


@pytest.fixture
def memory():  # type: ignore[no-untyped-def]
    task_backends["memory"].clear()  # type: ignore[attr-defined]
    yield "memory"
    task_backends["memory"].clear()  # type: ignore[attr-defined]


def runs_near_the_limit(alias: str, rounds: int, seen: Counter[str]) -> None:
    """Runs ending just before or after a 2 ms soft limit; what each run ended as."""
    for n in range(rounds):
        # A thread is warned up to one GIL switch interval (5 ms) late.
        task = on(tasks.busy_for, alias)
        result = task.enqueue(0.001 + (n % 10) * 0.001)
        try:
            outcome = invoke(task, result, soft_limit=0.002)
            seen[outcome.error.exception_class_path if outcome.error else "returned"] += 1
            time.sleep(0)
            sum(range(20000))  # well past the limit: a late raise would land here
        except BaseException as e:  # escaped the run: must never happen
            seen[f"escaped {type(e).__name__}"] += 1


def test_on_a_thread_the_limit_is_always_the_run_s_own_outcome(memory):
    seen: Counter[str] = Counter()
    thread = threading.Thread(target=runs_near_the_limit, args=(memory, 400, seen))
    thread.start()
    thread.join()
    assert set(seen) == {"returned", "conveyor.exceptions.SoftTimeLimitExceeded"}, seen


def test_on_the_main_thread_a_sleep_is_interrupted_and_the_timer_put_back(memory):
    task = on(tasks.log_line, memory)
    result = task.enqueue("/dev/null", "x", sleep=5)
    started = time.monotonic()
    outcome = invoke(task, result, soft_limit=0.05)
    assert time.monotonic() - started < 1
    assert outcome.error is not None
    assert "soft time limit of 0.05s" in outcome.error.traceback
    seen: Counter[str] = Counter()
    runs_near_the_limit(memory, 400, seen)
    assert set(seen) == {"returned", "conveyor.exceptions.SoftTimeLimitExceeded"}, seen
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_limit_arms_nothing(memory):
    task = on(tasks.add, memory)
    assert invoke(task, task.enqueue(1, 2), soft_limit=None).return_value == 3
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
