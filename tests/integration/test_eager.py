"""Eager mode: tasks run inside enqueue() (or at commit), as a worker would run them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import transaction
from django.tasks import TaskResultStatus, task_backends
from django.tasks.exceptions import TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.test import override_settings

import conveyor
from conveyor.eager import EagerBackend
from conveyor.exceptions import (
    ConveyorImproperlyConfigured,
    InvalidTaskArguments,
    InvalidTaskOption,
)
from conveyor.runtime.inprocess import InProcessWorker
from conveyor.testing import RunSummary, eager_tasks, run_until_done
from tests.helpers import job, on
from tests.testapp import tasks

EAGER = "eager"
AT_COMMIT = "eager_commit"


@pytest.fixture(autouse=True)
def empty_store() -> Iterator[None]:
    task_backends[EAGER].clear()  # type: ignore[attr-defined]
    yield
    task_backends[EAGER].clear()  # type: ignore[attr-defined]


@pytest.fixture
def signals() -> Iterator[list[tuple[str, str, Any]]]:
    """Every task signal sent, in order: (signal, status, sender)."""
    seen: list[tuple[str, str, Any]] = []
    receivers = {}
    for name, signal in (
        ("enqueued", task_enqueued),
        ("started", task_started),
        ("finished", task_finished),
    ):

        def note(sender: Any, task_result: Any, _name: str = name, **kwargs: Any) -> None:
            seen.append((_name, task_result.status, sender))

        receivers[name] = (signal, note)
        signal.connect(note)
    yield seen
    for signal, note in receivers.values():
        signal.disconnect(note)


def tries(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- running inline ------------------------------------------------------------------------


def test_a_task_runs_inside_enqueue_and_its_result_reads_back():
    result = on(tasks.add, EAGER).enqueue(2, 3)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert result.attempts == 1
    assert result.finished_at is not None
    again = job(result)
    assert (again.status, again.return_value, again.attempts) == (result.status, 5, 1)
    assert again.task.module_path == "tests.testapp.tasks.add"


def test_a_failure_is_recorded_not_raised():
    result = on(tasks.explode, EAGER).enqueue("boom")
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["builtins.ValueError"]
    assert "boom" in result.errors[0].traceback
    assert job(result).status == TaskResultStatus.FAILED


def test_async_tasks_and_bulk_enqueue_run_too():
    assert on(tasks.async_add, EAGER).enqueue(1, 1).return_value == 2
    results = conveyor.bulk_enqueue(on(tasks.add, EAGER), [(1, 2), conveyor.call(3, b=4)])
    assert [r.return_value for r in results] == [3, 7]
    assert [job(r).status for r in results] == [TaskResultStatus.SUCCESSFUL] * 2


def test_run_after_is_not_waited_for():
    from datetime import timedelta

    from django.utils import timezone

    later = timezone.now() + timedelta(hours=1)
    result = on(tasks.add, EAGER, run_after=later).enqueue(1, 2)
    assert result.status == TaskResultStatus.SUCCESSFUL


# --- retries, snoozes, context ----------------------------------------------------------------


def test_retries_run_at_once_until_the_task_succeeds(tmp_path: Path, signals):
    path = tmp_path / "tries"
    started = time.monotonic()
    result = on(tasks.fails_twice, EAGER).enqueue(str(path))  # retry_backoff=10
    assert time.monotonic() - started < 5  # the backoff is skipped
    assert tries(path) == 3
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == "done"
    assert result.attempts == 3
    assert [e.exception_class_path for e in result.errors] == ["builtins.ValueError"] * 2
    assert [(name, status) for name, status, _ in signals] == [
        ("enqueued", TaskResultStatus.READY),
        ("started", TaskResultStatus.RUNNING),
        ("started", TaskResultStatus.RUNNING),
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.SUCCESSFUL),
    ]


def test_a_failure_the_policy_retries_runs_until_the_retries_are_spent(signals):
    result = on(tasks.raises, EAGER).enqueue("ConnectionError")  # retries=5
    assert result.status == TaskResultStatus.FAILED
    assert len(result.errors) == 6
    assert [name for name, _, _ in signals].count("started") == 6
    assert [name for name, _, _ in signals][-1] == "finished"


def test_a_failure_the_policy_does_not_retry_runs_once(signals):
    result = on(tasks.raises, EAGER).enqueue("KeyError")  # retry_on=[ConnectionError]
    assert result.status == TaskResultStatus.FAILED
    assert [name for name, _, _ in signals].count("started") == 1


def test_retry_and_snooze_asked_by_the_task_run_again_at_once(tmp_path: Path):
    retried = on(tasks.asks_to_retry, EAGER, retries=2).enqueue(str(tmp_path / "r"), 3600)
    assert (retried.status, retried.return_value) == (TaskResultStatus.SUCCESSFUL, "done")
    assert tries(tmp_path / "r") == 3
    spent = on(tasks.asks_to_retry, EAGER).enqueue(str(tmp_path / "x"), 3600)  # retries=1
    assert spent.status == TaskResultStatus.FAILED  # Retry counts as a failed try
    assert tries(tmp_path / "x") == 2
    snoozed = on(tasks.snoozes, EAGER).enqueue(str(tmp_path / "s"), 3600)
    assert (snoozed.status, snoozed.return_value) == (TaskResultStatus.SUCCESSFUL, "woke")
    assert snoozed.errors == []  # a snooze is no failure
    assert tries(tmp_path / "s") == 2


def test_a_job_that_keeps_snoozing_fails_past_max_snoozes(tmp_path: Path):
    entry = {"BACKEND": "conveyor.eager.EagerBackend", "OPTIONS": {"MAX_SNOOZES": 3}}
    with override_settings(TASKS={**settings.TASKS, "eager_tight": entry}):
        result = on(tasks.always_snoozes, "eager_tight").enqueue(str(tmp_path / "s"))
    assert tries(tmp_path / "s") == 4
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class_path == "conveyor.exceptions.SnoozeLimit"
    assert "MAX_SNOOZES (3)" in error.traceback


def test_a_task_that_takes_context_sees_each_attempt():
    result = on(tasks.succeeds_on_third, EAGER).enqueue()
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, 3)
    assert [e.traceback.strip().splitlines()[-1] for e in result.errors] == [
        "ConnectionError: attempt 1",
        "ConnectionError: attempt 2",
    ]


def test_the_soft_time_limit_applies_inline(tmp_path: Path):
    path = tmp_path / "note"
    result = on(tasks.cleans_up, EAGER).enqueue(str(path))  # soft_timeout=0.3
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class_path == "conveyor.exceptions.SoftTimeLimitExceeded"
    assert path.read_text() == "cleaned up"


# --- hooks and signals ----------------------------------------------------------------------


def test_hooks_run_once_after_the_final_result(tmp_path: Path):
    notes, count = tmp_path / "notes", tmp_path / "tries"
    ok = on(tasks.hooked, EAGER).enqueue(str(notes), False)
    bad = on(tasks.hooked, EAGER).enqueue(str(notes), True)
    flaky = on(tasks.flaky_hooked, EAGER).enqueue(str(notes), str(count))
    assert tries(count) == 2
    assert notes.read_text().splitlines() == [
        f"SUCCESSFUL {ok.id} fine",  # on_success
        f"SUCCESSFUL {ok.id} fine",  # on_complete
        f"FAILED {bad.id} None",  # on_complete only
        f"SUCCESSFUL {flaky.id} fine",  # not after the try that was retried
    ]


def test_signals_and_log_records_are_djangos(signals, caplog):
    with caplog.at_level(logging.DEBUG, logger="django.tasks"):
        result = on(tasks.add, EAGER).enqueue(1, 1)
    assert signals == [
        ("enqueued", TaskResultStatus.READY, EagerBackend),
        ("started", TaskResultStatus.RUNNING, EagerBackend),
        ("finished", TaskResultStatus.SUCCESSFUL, EagerBackend),
    ]
    path = "tests.testapp.tasks.add"
    assert [r.getMessage() for r in caplog.records if r.name == "django.tasks"] == [
        f"Task id={result.id} path={path} enqueued backend={EAGER}",
        f"Task id={result.id} path={path} state=RUNNING",
        f"Task id={result.id} path={path} state=SUCCESSFUL",
    ]


def test_a_failure_is_logged_with_its_exception(caplog):
    with caplog.at_level(logging.INFO, logger="django.tasks"):
        on(tasks.explode, EAGER).enqueue("boom")
    [record] = [r for r in caplog.records if r.name == "django.tasks" and r.levelno > logging.INFO]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [object(), "a\x00b", {1: "a", "1": "b"}, 2**64])
def test_bad_arguments_are_refused_with_nothing_run(bad, signals):
    with pytest.raises(InvalidTaskArguments):
        on(tasks.add, EAGER).enqueue(bad, 1)
    with pytest.raises(InvalidTaskArguments):
        conveyor.bulk_enqueue(on(tasks.add, EAGER), [(1, 2), (bad, 1)])
    assert signals == []
    assert task_backends[EAGER].stats().pending == 0  # type: ignore[attr-defined]
    assert task_backends[EAGER].stats().finished == 0  # type: ignore[attr-defined]


def test_an_unknown_result_id_is_not_found():
    with pytest.raises(TaskResultDoesNotExist):
        task_backends[EAGER].get_result("00000000-0000-0000-0000-000000000000")


# --- at commit ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_at_commit_the_task_runs_when_the_transaction_commits(
    django_capture_on_commit_callbacks, signals
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        result = on(tasks.add, AT_COMMIT).enqueue(2, 2)
        assert result.status == TaskResultStatus.READY
        assert [name for name, _, _ in signals] == ["enqueued"]
        with pytest.raises(TaskResultDoesNotExist):  # it exists once the transaction commits
            job(result)
    assert len(callbacks) == 1
    result.refresh()
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, 4)
    assert [name for name, _, _ in signals] == ["enqueued", "started", "finished"]


@pytest.mark.django_db
def test_at_commit_a_rolled_back_enqueue_never_runs(django_capture_on_commit_callbacks, signals):
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        result = on(tasks.add, AT_COMMIT).enqueue(2, 2)
        raise RuntimeError("roll back")
    assert callbacks == []
    assert [name for name, _, _ in signals] == ["enqueued"]
    with pytest.raises(TaskResultDoesNotExist):
        job(result)


@pytest.mark.django_db
def test_at_commit_bulk_enqueue_runs_every_call_at_commit(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        results = conveyor.bulk_enqueue(on(tasks.add, AT_COMMIT), [(1, 1), (2, 2)])
    assert [job(r).return_value for r in results] == [2, 4]


@pytest.mark.django_db(transaction=True)
def test_at_commit_outside_a_transaction_the_task_runs_at_once():
    result = on(tasks.add, AT_COMMIT).enqueue(5, 5)
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, 10)
    with transaction.atomic():
        inside = on(tasks.add, AT_COMMIT).enqueue(1, 1)
        assert inside.status == TaskResultStatus.READY
    assert job(inside).return_value == 2


# --- options, workers and helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"RUN_AT": "later"}, r"\['RUN_AT'\] must be 'enqueue' or 'commit', not 'later'"),
        ({"RUN_AT": ""}, r"\['RUN_AT'\] must be a non-empty string"),
        ({"MAX_SNOOZES": -1}, r"\['MAX_SNOOZES'\] must be a whole number from 0 to 10000"),
        ({"MAX_SNOOZES": 2.5}, r"\['MAX_SNOOZES'\] must be a whole number"),
        (
            {"RUN_AT": "commit", "COMMIT_DATABASE": "nowhere"},
            r"\['COMMIT_DATABASE'\] is 'nowhere', which DATABASES does not define",
        ),
        ({"DATABASE": "default"}, r"unknown option\(s\) DATABASE"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ConveyorImproperlyConfigured, match=message):
        EagerBackend("eager_bad", {"OPTIONS": options})


def test_the_worker_refuses_an_eager_backend():
    with pytest.raises(CommandError, match=r"'eager' is a EagerBackend, which runs each task"):
        call_command("conveyor", "worker", "--backend", EAGER)
    with pytest.raises(CommandError, match=r"has no worker to start"):
        call_command("conveyor", "worker", "--backend", EAGER, "--in-process")
    with pytest.raises(ConveyorImproperlyConfigured, match=r"TASKS\['eager'\] uses EagerBackend"):
        InProcessWorker(EAGER).run()


def test_status_reads_an_eager_store():
    on(tasks.add, EAGER).enqueue(1, 1)
    assert task_backends[EAGER].stats().successful == 1  # type: ignore[attr-defined]


def test_run_until_done_has_nothing_left_to_run_on_an_eager_backend():
    on(tasks.add, EAGER).enqueue(1, 1)
    assert run_until_done(EAGER) == RunSummary()


def test_eager_tasks_turns_a_backend_eager_for_a_block():
    durable = settings.TASKS["default"]
    with eager_tasks():
        backend = task_backends["default"]
        assert isinstance(backend, EagerBackend)
        assert backend.queues == set(durable["QUEUES"])
        assert backend.database == durable["OPTIONS"]["DATABASE"]
        result = tasks.add.enqueue(20, 22)
        assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, 42)
    assert not isinstance(task_backends["default"], EagerBackend)


@pytest.mark.django_db
def test_eager_tasks_at_commit(django_capture_on_commit_callbacks):
    with eager_tasks(run_at="commit"), django_capture_on_commit_callbacks(execute=True):
        result = tasks.add.enqueue(1, 2)
        assert result.status == TaskResultStatus.READY
    assert result.backend == "default"
    with eager_tasks():
        result.refresh()
    assert result.return_value == 3


def test_a_unique_task_runs_once_while_its_last_run_counts():
    first = on(tasks.hourly_report, EAGER).enqueue("sales")
    again = on(tasks.hourly_report, EAGER).enqueue("sales")
    other = on(tasks.hourly_report, EAGER).enqueue("stock")
    assert first.status == TaskResultStatus.SUCCESSFUL and first.return_value == "report sales"
    assert again.id == first.id and again.return_value == "report sales"
    assert other.id != first.id


@pytest.mark.django_db
def test_at_commit_a_unique_task_is_refused_not_run_twice(django_capture_on_commit_callbacks):
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(InvalidTaskOption, match=r"unique_add is unique.*RUN_AT='enqueue'"),
    ):
        on(tasks.unique_add, AT_COMMIT).enqueue(1, 2)
    assert callbacks == []
