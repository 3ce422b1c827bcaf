"""A real worker honours a queue's pause within about a second, and its resume."""

from __future__ import annotations

import signal
import time

import pytest
from django.tasks import TaskResultStatus

from conveyor import queues
from tests.helpers import Worker, job, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance


def test_a_running_worker_honours_a_pause_and_a_resume(backend, backend_alias):
    with Worker(backend_alias, "--processes", "1") as worker:
        first = on(tasks.add, backend_alias, queue_name="emails").enqueue(1, 1)
        wait_for(lambda: job(first).status == TaskResultStatus.SUCCESSFUL)
        queues.pause("emails", backend=backend_alias)
        time.sleep(1.5)  # the worker looks at the pauses about once a second
        held = on(tasks.add, backend_alias, queue_name="emails").enqueue(2, 2)
        free = on(tasks.add, backend_alias).enqueue(3, 3)
        wait_for(lambda: job(free).status == TaskResultStatus.SUCCESSFUL)
        time.sleep(0.5)
        assert job(held).status == TaskResultStatus.READY
        queues.resume("emails", backend=backend_alias)
        # Idle, the worker looks at the pauses again when woken: at once where it can be.
        wait_for(lambda: job(held).status == TaskResultStatus.SUCCESSFUL, timeout=3)
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output


def test_an_idle_worker_takes_up_a_queue_when_its_timed_pause_ends(backend, backend_alias):
    # Nothing wakes workers when a pause runs out: an idle worker waits for its end.
    with Worker(backend_alias, "--processes", "1") as worker:
        warm = on(tasks.add, backend_alias).enqueue(0, 0)
        wait_for(lambda: job(warm).status == TaskResultStatus.SUCCESSFUL)
        queues.pause("emails", seconds=2.5, backend=backend_alias)
        time.sleep(1.2)  # the worker has looked at the pauses since
        held = on(tasks.add, backend_alias, queue_name="emails").enqueue(2, 2)
        time.sleep(0.5)
        assert job(held).status == TaskResultStatus.READY
        # Well before the longest idle wait (5 s) would end after the pause.
        wait_for(lambda: job(held).status == TaskResultStatus.SUCCESSFUL, timeout=3)
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output
