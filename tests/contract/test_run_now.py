"""Making scheduled jobs due at once (``run_now``), through the verbs on every store."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.tasks import TaskResultStatus
from django.utils import timezone

import conveyor
from conveyor.records import QueueSelector
from tests.helpers import job, on
from tests.testapp import tasks

ALL = QueueSelector()


def test_scheduled_jobs_become_ready_at_once(backend, backend_alias):
    later = on(tasks.add, backend_alias, run_after=timezone.now() + timedelta(hours=1))
    first, second = later.enqueue(1, 1), later.enqueue(2, 2)
    assert backend.claim("w", ALL, 5) == []

    assert backend.run_now([first.id]) == 1
    assert backend.next_due(ALL) is not None  # the other one is still due in an hour
    [claimed] = backend.claim("w", ALL, 5)
    assert claimed.id == first.id
    assert claimed.run_after is not None and claimed.run_after <= timezone.now() + timedelta(
        seconds=1
    )
    assert job(second).status == TaskResultStatus.READY
    assert backend.stats().scheduled == 1


def test_only_scheduled_jobs_move(backend, backend_alias):
    ready = on(tasks.add, backend_alias).enqueue(1, 1)
    running = on(tasks.add, backend_alias).enqueue(2, 2)
    backend.claim("w", ALL, 2)
    cancelled = on(tasks.add, backend_alias, run_after=timezone.now() + timedelta(hours=1))
    cancelled = cancelled.enqueue(3, 3)
    conveyor.cancel(cancelled)
    ids = [ready.id, running.id, cancelled.id, str(uuid.uuid4()), "not a result id"]
    assert backend.run_now(ids) == 0
    assert backend.run_now([]) == 0
    assert job(cancelled).errors[-1].exception_class_path == "conveyor.exceptions.Cancelled"


def test_a_job_run_now_joins_the_line_behind_ready_jobs_of_its_priority(backend, backend_alias):
    later = on(tasks.add, backend_alias, run_after=timezone.now() + timedelta(hours=1))
    scheduled = later.enqueue(1, 1)
    urgent = on(tasks.add, backend_alias, priority=10, run_after=later.run_after).enqueue(0, 0)
    waiting = on(tasks.add, backend_alias).enqueue(2, 2)
    assert backend.run_now([scheduled.id, urgent.id]) == 2
    claimed = backend.claim("w", ALL, 3)
    assert [j.id for j in claimed] == [urgent.id, waiting.id, scheduled.id]
