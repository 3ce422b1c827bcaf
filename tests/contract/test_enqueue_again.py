"""Enqueueing a finished job's call again (``conveyor.enqueue_again``), on every store."""

from __future__ import annotations

import pytest
from django.tasks import TaskResultStatus
from django.tasks.base import TaskError
from django.tasks.exceptions import TaskResultDoesNotExist

import conveyor
from conveyor.records import QueueSelector
from tests.contract.stores import raised
from tests.helpers import job, on
from tests.testapp import tasks

ALL = QueueSelector()
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom\n")


def test_a_failed_job_is_enqueued_again_as_a_new_job(backend, backend_alias):
    first = on(tasks.add, backend_alias, queue_name="reports", priority=7).enqueue(2, b=3)
    [claimed] = backend.claim("w", ALL, 1)
    backend.fail(claimed, raised(BOOM))

    again = conveyor.enqueue_again(first)
    assert again.id != first.id
    assert (again.args, again.kwargs) == ([2], {"b": 3})
    assert (again.task.queue_name, again.task.priority) == ("reports", 7)
    assert again.status == TaskResultStatus.READY and again.task.run_after is None
    old = job(first)
    assert old.status == TaskResultStatus.FAILED and len(old.errors) == 1
    [rerun] = backend.claim("w", ALL, 1)
    assert rerun.id == again.id


def test_only_finished_jobs_are_enqueued_again(backend, backend_alias):
    pending = on(tasks.add, backend_alias).enqueue(1, 1)
    with pytest.raises(ValueError, match="has not finished"):
        conveyor.enqueue_again(pending.id, backend_alias)
    conveyor.cancel(pending)
    assert conveyor.enqueue_again(pending.id, backend_alias).args == [1, 1]
    with pytest.raises(TaskResultDoesNotExist):
        conveyor.enqueue_again("00000000-0000-0000-0000-000000000000", backend_alias)
