"""Retries, Retry and Snooze, through the in-process worker and the store's clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.tasks import TaskResultStatus, task
from django.tasks.exceptions import InvalidTask

from conveyor.exceptions import InvalidTaskOption, Retry, Snooze
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.helpers import job, on
from tests.testapp import tasks


def test_a_failure_is_retried_with_backoff_and_every_try_stays_visible(
    backend_alias, tmp_path: Path
):
    result = on(tasks.fails_twice, backend_alias).enqueue(str(tmp_path / "tries"))
    with store_clock() as clock:
        assert run_until_done(backend_alias) == RunSummary(retried=1)
        waiting = job(result)
        assert waiting.status == TaskResultStatus.READY and waiting.attempts == 1
        assert [e.exception_class_path for e in waiting.errors] == ["builtins.ValueError"]
        assert "not yet" in waiting.errors[0].traceback
        clock.advance(9.5)  # the first retry waits retry_backoff (10 s)
        assert run_until_done(backend_alias).ran == 0
        clock.advance(1)
        assert run_until_done(backend_alias) == RunSummary(retried=1)
        clock.advance(19)  # the second waits twice as long
        assert run_until_done(backend_alias).ran == 0
        clock.advance(1.5)
        assert run_until_done(backend_alias) == RunSummary(succeeded=1)
    done = job(result)
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == "done"
    assert done.attempts == 3 and len(done.errors) == 2


def test_retries_run_out(backend_alias):
    result = on(tasks.raises, backend_alias).using(retries=1).enqueue("ConnectionError")
    with store_clock() as clock:
        assert run_until_done(backend_alias) == RunSummary(retried=1)
        clock.advance(1.1)
        assert run_until_done(backend_alias) == RunSummary(failed=1)
    failed = job(result)
    assert failed.status == TaskResultStatus.FAILED and failed.attempts == 2
    assert [e.exception_class_path for e in failed.errors] == ["builtins.ConnectionError"] * 2


@pytest.mark.parametrize(
    ("task", "kind", "retried"),
    [
        (tasks.raises, "ConnectionResetError", True),  # a subclass of what retry_on lists
        (tasks.raises, "ValueError", False),  # not listed in retry_on
        (tasks.raises_any, "ValueError", True),
        (tasks.raises_any, "PermissionError", False),  # listed in dont_retry_on
    ],
)
def test_which_exceptions_are_retried(backend_alias, task, kind: str, retried: bool):
    result = on(task, backend_alias).enqueue(kind)
    summary = run_until_done(backend_alias)
    assert summary == (RunSummary(retried=1) if retried else RunSummary(failed=1))
    expected = TaskResultStatus.READY if retried else TaskResultStatus.FAILED
    assert job(result).status == expected


def test_the_policy_is_the_one_the_job_was_enqueued_with(backend_alias, tmp_path: Path):
    # Changing the task (a deploy) does not change jobs already queued.
    result = on(tasks.fails_twice, backend_alias).using(retries=0).enqueue(str(tmp_path / "t"))
    assert run_until_done(backend_alias) == RunSummary(failed=1)
    assert job(result).status == TaskResultStatus.FAILED


def test_snooze_runs_again_later_without_a_failure(backend_alias, tmp_path: Path):
    result = on(tasks.snoozes, backend_alias).enqueue(str(tmp_path / "tries"), 60)
    with store_clock() as clock:
        assert run_until_done(backend_alias) == RunSummary(snoozed=1)
        snoozed = job(result)
        assert snoozed.status == TaskResultStatus.READY and snoozed.errors == []
        clock.advance(59)
        assert run_until_done(backend_alias).ran == 0
        clock.advance(2)
        assert run_until_done(backend_alias) == RunSummary(succeeded=1)
    done = job(result)
    assert done.return_value == "woke" and done.errors == []


def test_a_task_asks_to_be_retried_and_retries_bound_it(backend_alias, tmp_path: Path):
    result = on(tasks.asks_to_retry, backend_alias).enqueue(str(tmp_path / "tries"), 5)
    with store_clock() as clock:
        assert run_until_done(backend_alias) == RunSummary(retried=1)
        clock.advance(4)
        assert run_until_done(backend_alias).ran == 0
        clock.advance(1.5)
        assert run_until_done(backend_alias) == RunSummary(failed=1)  # retries=1 spent
    failed = job(result)
    assert [e.exception_class_path for e in failed.errors] == ["conveyor.exceptions.Retry"] * 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, r"retries must be a whole number from 0 to 1000, not -1"),
        ({"retries": 1.5}, r"retries must be a whole number"),
        ({"retry_backoff": float("nan")}, r"retry_backoff must be a number"),
        ({"retry_jitter": "yes"}, r"retry_jitter must be True or False"),
        ({"retry_on": [ValueError, "KeyError"]}, r"retry_on must list exception.*'KeyError'"),
        ({"dont_retry_on": int}, r"dont_retry_on must list exception classes"),
        ({"retires": 3}, r"unknown option\(s\) 'retires'; Conveyor's options are retries"),
    ],
)
def test_bad_options_are_refused_naming_the_task_and_the_option(options, message: str):
    with pytest.raises(InvalidTaskOption, match=rf"tests\.contract\.test_retries\.\w+.*{message}"):
        task(**options)(module_level)
    assert issubclass(InvalidTaskOption, InvalidTask) and issubclass(InvalidTaskOption, TypeError)
    with pytest.raises(InvalidTaskOption, match=message.split(" must")[0].split(";")[0]):
        task(module_level).using(**options)


def module_level(x: int) -> int:
    return x


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True, 400 * 86400])
def test_bad_delays_are_refused_where_they_are_made(bad):
    with pytest.raises(ValueError, match=r"Snooze\(delay\) must be"):
        Snooze(bad)
    with pytest.raises(ValueError, match=r"Retry\(delay\) must be"):
        Retry(delay=bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, r"timeout must be a number from 0\.001"),
        ({"timeout": -5}, r"timeout must be a number"),
        ({"soft_timeout": float("inf")}, r"soft_timeout must be a number"),
        ({"timeout": 2, "soft_timeout": 2}, r"soft_timeout \(2s\) must be shorter than timeout"),
        ({"max_attempts": 0}, r"max_attempts must be a whole number from 1"),
        ({"sigkill_on_stop": "yes"}, r"sigkill_on_stop must be True or False"),
    ],
)
def test_bad_limits_are_refused_naming_the_task_and_the_option(options, message: str):
    with pytest.raises(InvalidTaskOption, match=rf"test_retries\.module_level: .*{message}"):
        task(**options)(module_level)
