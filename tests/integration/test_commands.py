"""``manage.py conveyor``: values checked at the door, safe output, the in-process worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import ClassVar

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.tasks import TaskResultStatus, task_backends
from django.tasks.exceptions import TaskResultDoesNotExist
from django.test import override_settings
from django.utils import timezone

from conveyor.backends.memory import MemoryBackend
from conveyor.monitoring import printable, render_stats
from conveyor.records import QueueSelector, QueueStats
from conveyor.testing import run_until_done, store_clock
from tests.contract.stores import returned
from tests.helpers import MANAGE, ROOT, Worker, job, lines, on, wait_for
from tests.testapp import tasks

# --- values checked by argparse ---------------------------------------------------------

REFUSED = [
    ("prune", "--older-than", "-5"),
    ("prune", "--older-than", "nan"),
    ("prune", "--older-than", "inf"),
    ("prune", "--older-than", "1e400"),
    ("prune", "--older-than", "-inf"),
    ("prune", "--older-than", "1000000000"),  # past datetime's range
    ("prune", "--older-than", "a week"),
    ("prune", "--batch", "0"),
    ("prune", "--batch", "-1"),
    ("prune", "--batch", "10001"),
    ("prune", "--batch", "1.5"),
    ("worker", "--grace", "0"),
    ("worker", "--grace", "-1"),
    ("worker", "--grace", "nan"),
    ("worker", "--grace", "inf"),
    ("worker", "--grace", "86401"),
    ("worker", "--processes", "0"),
    ("worker", "--processes", "513"),
    ("worker", "--processes", "two"),
    ("worker", "--threads", "0"),
    ("worker", "--threads", "257"),
    ("worker", "--max-tasks-per-child", "0"),
    ("worker", "--max-tasks-per-child", "-3"),
    ("worker", "--max-tasks-per-child", "1000000001"),
]


@pytest.mark.parametrize(("action", "option", "value"), REFUSED)
def test_bad_values_are_refused_naming_the_option(action: str, option: str, value: str):
    # --option=value: a value starting with "-" reaches the option's type, not the parser.
    with pytest.raises(CommandError) as refused:
        call_command("conveyor", action, f"{option}={value}")
    message = str(refused.value)
    assert f"argument {option}: must be a " in message
    assert repr(value) in message


def test_the_messages_say_what_is_allowed():
    cases = {
        ("prune", "--older-than=-5"): "must be a number from 0 up to 36500, not '-5'.",
        ("prune", "--batch=0"): "must be a whole number from 1 to 10000, not '0'.",
        ("worker", "--grace=nan"): "must be a number more than 0 up to 86400, not 'nan'.",
        ("worker", "--processes=0"): "must be a whole number from 1 to 512, not '0'.",
        ("worker", "--threads=300"): "must be a whole number from 1 to 256, not '300'.",
    }
    for args, expected in cases.items():
        with pytest.raises(CommandError, match=expected.replace(".", r"\.")):
            call_command("conveyor", *args)


@pytest.mark.parametrize(
    ("action", "option", "value"),
    [
        ("prune", "--older-than", "0"),
        ("prune", "--older-than", "36500"),
        ("prune", "--older-than", "0.5"),
        ("prune", "--batch", "1"),
        ("prune", "--batch", "10000"),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_values_at_the_bounds_are_taken(action: str, option: str, value: str):
    out = StringIO()
    call_command("conveyor", action, option, value, stdout=out)
    assert "Deleted 0 job(s) kept past their retention." in out.getvalue()


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py conveyor ARGS`` as a user types it."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(
        [sys.executable, str(MANAGE), "conveyor", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_command_line_refuses_bad_values_with_usage_and_status_2():
    done = manage("prune", "--older-than", "-5")
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert "argument --older-than: must be a number from 0 up to 36500, not '-5'." in done.stderr
    done = manage("worker", "--grace", "inf")
    assert done.returncode == 2
    assert "argument --grace: must be a number more than 0 up to 86400, not 'inf'." in done.stderr


# --- prune ----------------------------------------------------------------------------------


def finish_old_job(alias: str = "default", days: float = 30) -> str:
    """Run one job and record it as finished ``days`` ago; return its id."""
    backend = task_backends[alias]
    result = on(tasks.add, alias).enqueue(1, 2)
    [claimed] = backend.claim("w", QueueSelector(), 1)  # type: ignore[attr-defined]
    backend.complete([(claimed, returned(3, timezone.now() - timedelta(days=days)))])  # type: ignore[attr-defined]
    return result.id


@pytest.mark.django_db(transaction=True)
def test_a_negative_age_deletes_nothing():
    old = finish_old_job()
    with pytest.raises(CommandError, match="--older-than"):
        call_command("conveyor", "prune", "--older-than=-5")
    assert task_backends["default"].get_result(old).status == TaskResultStatus.SUCCESSFUL


class CountingPrune(MemoryBackend):
    """The memory store, noting the batch size each prune and expiry is asked for."""

    batches: ClassVar[list[int]] = []
    expiries: ClassVar[list[int]] = []

    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        self.batches.append(batch)
        return super().prune(finished_before, batch=batch, pause=0.0)

    def expire(self, *, batch: int = 1000, pause: float = 0.01, limit: int | None = None) -> int:
        self.expiries.append(batch)
        return super().expire(batch=batch, pause=0.0, limit=limit)


@pytest.fixture
def counting() -> Iterator[str]:
    entry = {"BACKEND": f"{__name__}.CountingPrune", "QUEUES": settings.TASKS["default"]["QUEUES"]}
    with override_settings(TASKS={**settings.TASKS, "counting": entry}):
        task_backends["counting"].clear()  # type: ignore[attr-defined]
        CountingPrune.batches.clear()
        CountingPrune.expiries.clear()
        yield "counting"
        task_backends["counting"].clear()  # type: ignore[attr-defined]


def test_prune_passes_the_batch_size(counting: str):
    for _ in range(5):
        finish_old_job(counting)
    out = StringIO()
    call_command(
        "conveyor", "prune", "--backend", counting, "--batch", "2", "--older-than", "7", stdout=out
    )
    assert "Deleted 5 finished job(s) older than 7 day(s)." in out.getvalue()
    call_command("conveyor", "prune", "--backend", counting, "--older-than", "7", stdout=out)
    assert CountingPrune.batches == [2, 1000]
    assert CountingPrune.expiries == [2, 1000]


def test_prune_keeps_jobs_younger_than_the_age(counting: str):
    young = finish_old_job(counting, days=1)
    finish_old_job(counting, days=3)
    out = StringIO()
    call_command("conveyor", "prune", "--backend", counting, "--older-than", "2", stdout=out)
    assert "Deleted 1 finished job(s) older than 2 day(s)." in out.getvalue()
    assert task_backends[counting].get_result(young).status == TaskResultStatus.SUCCESSFUL


def test_prune_without_an_age_deletes_only_what_retention_lets_go(counting: str):
    old = finish_old_job(counting, days=3650)  # kept: no retention
    backend = task_backends[counting]
    expiring = on(tasks.add, counting, result_ttl=60).enqueue(1, 2)
    failed = on(tasks.explode, counting, result_ttl=60).enqueue("boom")  # failures kept
    run_until_done(counting)
    out = StringIO()
    with store_clock() as clock:
        clock.advance(61)
        call_command("conveyor", "prune", "--backend", counting, stdout=out)
    assert out.getvalue() == "Deleted 1 job(s) kept past their retention.\n"
    assert CountingPrune.batches == [] and CountingPrune.expiries == [1000]
    assert backend.get_result(old).status == TaskResultStatus.SUCCESSFUL
    assert backend.get_result(failed.id).status == TaskResultStatus.FAILED
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result(expiring.id)


@pytest.mark.django_db(transaction=True)
def test_prune_applies_retention_on_the_database_too():
    result = on(tasks.add, "default", result_ttl=0).enqueue(1, 2)
    run_until_done("default")
    out = StringIO()
    call_command("conveyor", "prune", "--older-than", "30", stdout=out)
    assert out.getvalue().splitlines() == [
        "Deleted 1 job(s) kept past their retention.",
        "Deleted 0 finished job(s) older than 30 day(s).",
    ]
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result(result.id)


# --- status output ----------------------------------------------------------------------------


def test_printable_escapes_what_could_drive_a_terminal():
    assert printable("emails") == "emails"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("line\nbreak\r\t\x00\x7f") == "line\\x0abreak\\x0d\\x09\\x00\\x7f"
    assert printable("rtl\u202eevil\u2028") == "rtl\\u202eevil\\u2028"
    assert printable("\U000e0001tag") == "\\U000e0001tag"
    assert printable("naïve 日本 ü") == "naïve 日本 ü"
    # A backslash is doubled, so no name reads like another one escaped.
    assert printable("a\\x1bb") == "a\\\\x1bb"
    assert printable("a\\x1bb") != printable("a\x1bb")


def test_render_stats_escapes_queue_names_and_the_alias():
    counts = dict.fromkeys(("ready", "scheduled", "running", "successful", "failed"), 0)
    stats = QueueStats(ready=2, by_queue={"a\x1b[2Jb": {**counts, "ready": 1}, "ok": counts})
    out = StringIO()
    render_stats(stats, "al\x07ias", out)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.startswith("Backend 'al\\x07ias'\n")
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows["a\\x1b[2Jb"] == ["1", "0", "0", "0", "0"]
    assert rows["total"] == ["2", "0", "0", "0", "0"]
    widths = {len(line) for line in text.splitlines()[1:]}
    assert len(widths) == 1  # the columns line up with the escaped name


@pytest.mark.django_db(transaction=True)
def test_status_escapes_control_characters_in_queue_names():
    entry = {**settings.TASKS["default"], "QUEUES": []}  # any queue name
    with override_settings(TASKS={**settings.TASKS, "open": entry}):
        on(tasks.add, "open", queue_name="a\x1b[2Jb").enqueue(1, 1)
        on(tasks.add, "open", queue_name="bell\x07\u202e").enqueue(1, 1)
        out = StringIO()
        call_command("conveyor", "status", "--backend", "open", stdout=out)
    text = out.getvalue()
    assert not any(not ch.isprintable() for ch in text.replace("\n", ""))
    assert "a\\x1b[2Jb" in text and "bell\\x07\\u202e" in text


def test_an_unknown_backend_is_named_escaped():
    with pytest.raises(CommandError) as refused:
        call_command("conveyor", "status", "--backend", "no\x1bpe")
    assert "\x1b" not in str(refused.value)


# --- the in-process worker --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--processes", "2"], "--processes"),
        (["--threads", "4"], "--threads"),
        (["--grace", "5"], "--grace"),
        (["--progress"], "--progress"),
        (["--processes", "2", "--threads", "2"], "--processes, --threads"),
    ],
)
def test_in_process_refuses_pool_options(args: list[str], named: str):
    with pytest.raises(CommandError, match=f"cannot be combined with {named}\\."):
        call_command("conveyor", "worker", "--backend", "memory", "--in-process", *args)


def test_in_process_through_call_command_runs_and_returns():
    task_backends["memory"].clear()  # type: ignore[attr-defined]
    ok = on(tasks.add, "memory").enqueue(2, 2)
    bad = on(tasks.explode, "memory").enqueue("no")
    email = on(tasks.send_email, "memory").enqueue("a@example.com")
    out = StringIO()
    args = ["--backend", "memory", "--in-process", "--until-done", "--exclude-queue", "emails"]
    call_command("conveyor", "worker", *args, stdout=out)  # no SystemExit: status 0
    assert "Ran 2 job(s): 1 succeeded, 1 failed, 0 to retry." in out.getvalue()
    assert job(ok).return_value == 4
    assert job(bad).status == TaskResultStatus.FAILED
    assert job(email).status == TaskResultStatus.READY
    task_backends["memory"].clear()  # type: ignore[attr-defined]


def test_in_process_max_tasks():
    task_backends["memory"].clear()  # type: ignore[attr-defined]
    for i in range(3):
        on(tasks.add, "memory").enqueue(i, i)
    out = StringIO()
    args = ["--backend", "memory", "--in-process", "--max-tasks-per-child", "2"]
    call_command("conveyor", "worker", *args, stdout=out)
    assert "Ran 2 job(s): 2 succeeded" in out.getvalue()
    assert run_until_done("memory").succeeded == 1
    task_backends["memory"].clear()  # type: ignore[attr-defined]


@pytest.mark.django_db(transaction=True)
def test_in_process_from_the_command_line():
    ok = tasks.add.enqueue(20, 22)
    bad = tasks.explode.enqueue("no")
    worker = Worker("default", "--in-process", "--until-done")
    assert worker.wait() == 0, worker.output
    assert "Ran 2 job(s): 1 succeeded, 1 failed, 0 to retry." in worker.output
    assert job(ok).return_value == 42
    assert job(bad).status == TaskResultStatus.FAILED
    [row] = task_backends["default"].workers(alive=False)  # type: ignore[attr-defined]
    assert row.id in job(ok).worker_ids and row.ended == "stopped" and row.pid == worker.pid


@pytest.mark.django_db(transaction=True)
def test_in_process_stops_gracefully_on_sigterm(tmp_path: Path):
    log = tmp_path / "log"
    result = tasks.log_line.enqueue(str(log), "slow", sleep=1.0)
    with Worker("default", "--in-process") as worker:
        wait_for(lambda: lines(log))
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output
    assert "Stopping once the running task finishes" in worker.output
    assert lines(log)[-1].startswith("end slow")
    assert job(result).status == TaskResultStatus.SUCCESSFUL


@pytest.mark.django_db(transaction=True)
def test_a_second_signal_stops_the_in_process_worker_at_once(tmp_path: Path):
    log = tmp_path / "log"
    result = tasks.log_line.enqueue(str(log), "stuck", sleep=30.0)
    with Worker("default", "--in-process") as worker:
        wait_for(lambda: lines(log))
        worker.signal(signal.SIGINT)
        time.sleep(0.2)
        began = time.monotonic()
        worker.signal(signal.SIGINT)
        assert worker.wait(timeout=10) == 1, worker.output
        assert time.monotonic() - began < 10
    # Put back uncounted, as after a forced stop of a supervised worker.
    row = job(result)
    assert row.status == TaskResultStatus.READY
    assert "the in-process worker interrupted" in row.errors[-1].traceback
    [ended] = task_backends["default"].workers(alive=False)  # type: ignore[attr-defined]
    assert ended.ended == "interrupted"


@pytest.mark.django_db(transaction=True)
def test_queues_command_pauses_resumes_clears_and_dedupes():
    from io import StringIO

    from conveyor import queues
    from tests.testapp import tasks

    out = StringIO()
    call_command("conveyor", "queues", "pause", "emails", "--for", "60", stdout=out)
    assert "Queue 'emails' paused until" in out.getvalue()
    assert set(queues.paused()) == {"emails"}
    out = StringIO()
    call_command("conveyor", "queues", stdout=out)
    assert "emails: paused until" in out.getvalue()
    call_command("conveyor", "queues", "resume", "emails", stdout=StringIO())
    assert queues.paused() == {}
    tasks.add.using(queue_name="emails").enqueue(1, 1)
    tasks.add.using(queue_name="emails").enqueue(1, 1)
    out = StringIO()
    call_command("conveyor", "queues", "dedupe", "emails", stdout=out)
    assert "Deleted 1 duplicate job(s)" in out.getvalue()
    with pytest.raises(CommandError, match="add --yes"):
        call_command("conveyor", "queues", "clear", "emails")
    out = StringIO()
    call_command("conveyor", "queues", "clear", "emails", "--yes", stdout=out)
    assert "Deleted 1 job(s) of queue 'emails'" in out.getvalue()
    with pytest.raises(CommandError, match="no queue 'nowhere'"):
        call_command("conveyor", "queues", "pause", "nowhere")
    with pytest.raises(CommandError, match="needs the name"):
        call_command("conveyor", "queues", "pause")
