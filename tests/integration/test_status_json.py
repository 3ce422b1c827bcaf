"""``manage.py conveyor status --json``: one document for scripts, the same keys every time."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.tasks import task_backends
from django.tasks.base import TaskError
from django.test import override_settings

from conveyor import schedules
from conveyor.records import QueueSelector, WorkerInfo
from conveyor.testing import store_clock
from tests.contract.stores import raised, returned
from tests.helpers import MANAGE, ROOT, on, subprocess_env
from tests.testapp import tasks

BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom\n")
COUNTS = {"ready", "scheduled", "running", "successful", "failed"}
WORKER_KEYS = {
    "id",
    "kind",
    "host",
    "pid",
    "supervisor",
    "queues",
    "threads",
    "started_at",
    "last_beat_at",
    "online",
}
SCHEDULE_KEYS = {
    "name",
    "task",
    "timetable",
    "state",
    "source",
    "next_run_at",
    "last_run_at",
    "runs",
}


@pytest.fixture
def memory():
    backend = task_backends["memory"]
    backend.clear()
    yield backend
    backend.clear()


def _status(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command("conveyor", "status", "--json", *args, stdout=out)
    return json.loads(out.getvalue())


def _fill(backend) -> None:
    """Jobs in every state, a worker and a schedule."""
    on(tasks.send_email, backend.alias).enqueue("a@example.com")  # stays running
    on(tasks.add, backend.alias).enqueue(2, 2)
    on(tasks.add, backend.alias).enqueue(3, 3)
    _, ok, bad = backend.claim("w", QueueSelector(), 3)
    backend.complete([(ok, returned(4))])
    backend.fail(bad, raised(BOOM))
    on(tasks.add, backend.alias).enqueue(1, 1)  # stays ready
    backend.register_worker(
        WorkerInfo(
            id="host:1:abc",
            backend=backend.alias,
            kind="process",
            host="host",
            pid=1,
            queues="default,emails",
            threads=2,
        )
    )
    schedules.create("nightly", tasks.noop, cron="30 2 * * *", backend=backend.alias)


def test_counts_workers_and_schedules_in_one_document(memory):
    _fill(memory)
    doc = _status("--backend", "memory")

    assert set(doc) == {"backend", "generated_at", "queues", "totals", "workers", "schedules"}
    assert doc["backend"] == "memory"
    assert datetime.fromisoformat(doc["generated_at"]).utcoffset() is not None
    assert set(doc["queues"]) == {"default", "emails", "reports"}  # empty queues too
    assert doc["queues"]["default"] == {
        "ready": 1,
        "scheduled": 0,
        "running": 0,
        "successful": 1,
        "failed": 1,
    }
    assert doc["queues"]["emails"]["running"] == 1
    assert doc["queues"]["reports"] == dict.fromkeys(COUNTS, 0)
    assert doc["totals"] == {"ready": 1, "scheduled": 0, "running": 1, "successful": 1, "failed": 1}

    [worker] = doc["workers"]
    assert set(worker) == WORKER_KEYS
    assert (worker["id"], worker["kind"], worker["pid"]) == ("host:1:abc", "process", 1)
    assert worker["queues"] == "default,emails" and worker["threads"] == 2
    assert worker["online"] is True and worker["supervisor"] is None
    beat = datetime.fromisoformat(worker["last_beat_at"])
    assert abs((datetime.fromisoformat(doc["generated_at"]) - beat).total_seconds()) < 60

    [nightly] = doc["schedules"]
    assert set(nightly) == SCHEDULE_KEYS
    assert nightly["name"] == "nightly" and nightly["task"] == "tests.testapp.tasks.noop"
    assert nightly["timetable"] == "cron 30 2 * * * (UTC)" and nightly["state"] == "active"
    assert datetime.fromisoformat(nightly["next_run_at"]).utcoffset() is not None
    assert nightly["last_run_at"] is None and nightly["runs"] == 0


def test_an_empty_backend_has_the_same_keys(memory):
    doc = _status("--backend", "memory")
    assert set(doc) == {"backend", "generated_at", "queues", "totals", "workers", "schedules"}
    assert doc["totals"] == dict.fromkeys(COUNTS, 0)
    assert doc["workers"] == [] and doc["schedules"] == []


def test_queue_options_narrow_the_counts(memory):
    _fill(memory)
    doc = _status("--backend", "memory", "--queue", "emails")
    assert set(doc["queues"]) == {"emails"}
    assert doc["totals"]["running"] == 1 and doc["totals"]["ready"] == 0
    doc = _status("--backend", "memory", "--exclude-queue", "emails")
    assert set(doc["queues"]) == {"default", "reports"}


def test_a_worker_that_stopped_beating_is_not_online(memory):
    _fill(memory)
    with store_clock() as clock:
        clock.advance(memory.conveyor_options.lease + 1)
        [worker] = _status("--backend", "memory")["workers"]
    assert worker["online"] is False


def test_a_paused_schedule_says_so(memory):
    _fill(memory)
    schedules.pause("nightly", backend="memory")
    [nightly] = _status("--backend", "memory")["schedules"]
    assert nightly["state"] == "paused"


def test_names_reach_the_terminal_only_as_json_escapes(memory):
    entry = {**settings.TASKS["memory"], "QUEUES": []}  # any queue name
    with override_settings(TASKS={**settings.TASKS, "open": entry}):
        on(tasks.add, "open", queue_name="a\x1b[2Jb\u202e").enqueue(1, 1)
        out = StringIO()
        call_command("conveyor", "status", "--json", "--backend", "open", stdout=out)
    text = out.getvalue()
    assert text.isascii() and "\x1b" not in text
    assert "a\\u001b[2Jb\\u202e" in text
    assert "a\x1b[2Jb\u202e" in json.loads(text)["queues"]


@pytest.mark.django_db(transaction=True)
def test_on_the_database_from_the_command_line():
    backend = task_backends["default"]
    _fill(backend)
    done = subprocess.run(
        [sys.executable, str(MANAGE), "conveyor", "status", "--json"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc = json.loads(done.stdout)
    assert doc["totals"] == {"ready": 1, "scheduled": 0, "running": 1, "successful": 1, "failed": 1}
    assert [w["id"] for w in doc["workers"]] == ["host:1:abc"]
    assert [s["name"] for s in doc["schedules"]] == ["nightly"]
