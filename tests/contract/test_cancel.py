"""Cancelling a running job and reading its progress, through the verbs on every store."""

from __future__ import annotations

import pytest
from django.tasks import TaskResultStatus
from django.tasks.base import TaskError
from django.tasks.exceptions import TaskResultDoesNotExist

import conveyor
from conveyor.records import QueueSelector
from tests.contract.stores import raised
from tests.helpers import on
from tests.testapp import tasks

ALL = QueueSelector()
CANCELLED = TaskError(
    exception_class_path="conveyor.exceptions.Cancelled", traceback="Cancelled: asked to\n"
)


def test_a_running_job_is_asked_to_stop_and_ends_cancelled(backend, backend_alias):
    running = on(tasks.add, backend_alias).enqueue(1, 1)
    other = on(tasks.add, backend_alias).enqueue(2, 2)
    first, second = backend.claim("w", ALL, 2)
    assert backend.cancels([(first.key, first.delivery)]) == set()

    assert conveyor.cancel(running) == conveyor.CancelOutcome.STOPPING
    asked = backend.cancels([(first.key, first.delivery), (second.key, second.delivery)])
    assert asked == {(first.key, first.delivery)}
    assert backend.cancels([(first.key, "0" * 16)]) == set()  # another delivery's token

    assert backend.fail(first, raised(CANCELLED))
    done = backend.get_result(running.id)
    assert done.status == TaskResultStatus.FAILED
    assert done.errors[-1].exception_class_path == "conveyor.exceptions.Cancelled"
    assert backend.stats().failed == 1
    assert conveyor.cancel(running) == conveyor.CancelOutcome.FINISHED
    assert backend.get_result(other.id).status == TaskResultStatus.RUNNING


def test_a_job_not_started_is_cancelled_outright(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 1)
    assert conveyor.cancel(result.id, backend_alias) == conveyor.CancelOutcome.CANCELLED
    assert backend.claim("w", ALL, 1) == []
    with pytest.raises(TaskResultDoesNotExist):
        conveyor.cancel("00000000-0000-0000-0000-000000000000", backend_alias)


def test_progress_is_kept_for_the_delivery_that_reports_it(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 1)
    assert conveyor.progress(result) is None
    [claimed] = backend.claim("w", ALL, 1)
    report = {"done": 3, "total": 10, "message": "three of ten"}
    assert backend.report_progress(claimed, report)
    assert conveyor.progress(result) == report
    backend.unclaim([claimed])
    assert not backend.report_progress(claimed, {"done": 4, "total": 10, "message": ""})
    assert conveyor.progress(result) == report
