"""A real worker syncs the code schedules at start-up, and ``--no-scheduler`` fires none."""

from __future__ import annotations

import signal
import time

import pytest
from django.tasks import TaskResultStatus

from conveyor import schedules
from conveyor.exceptions import ScheduleNotFound
from conveyor.records import ScheduleInfo
from tests.helpers import Worker, job, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance

REPORT = "tests.testapp.tasks.scheduled_report"
MANUAL = "testapp-manual"  # declared with @schedule in tests/testapp/tasks.py


def stop(worker: Worker) -> None:
    """SIGTERM the worker and check it stopped cleanly."""
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.output
    assert "Traceback" not in worker.output, worker.output


def stored(name: str, alias: str) -> ScheduleInfo | None:
    try:
        return schedules.get(name, backend=alias)
    except ScheduleNotFound:
        return None


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_a_worker_adds_declared_code_schedules_and_retires_undeclared_ones(backend, backend_alias):
    timetable = schedules.timetable_for("gone-from-code", cron="0 3 * * *")
    gone = schedules.spec_for("gone-from-code", REPORT, timetable, args=["g"], source="code")
    # Stored by an earlier release of the code, which declared "gone-from-code"; not since.
    backend.sync_schedules([gone])
    assert stored(MANUAL, backend_alias) is None
    assert stored("gone-from-code", backend_alias).retired is False  # type: ignore[union-attr]

    worker = Worker(backend_alias, "--processes", "1")
    try:
        info = wait_for(lambda: stored(MANUAL, backend_alias), timeout=30)
        retired = wait_for(
            lambda: (s := stored("gone-from-code", backend_alias)) is not None and s.retired,
            timeout=30,
        )
        assert retired
        assert info.spec.source == "code" and info.spec.task_path == tasks.manual_ping.module_path
        assert info.spec.args == ("manual",) and info.next_run_at is None  # runs when asked
        assert [s.name for s in schedules.all(backend=backend_alias)] == [MANUAL]
        # The worker runs what the code schedule enqueues when asked to.
        result = schedules.run(MANUAL, backend=backend_alias)
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL, timeout=30)
        assert job(result).return_value == "manual"
    finally:
        stop(worker)
    assert "Added schedule(s) testapp-manual." in worker.output
    assert "Retired schedule(s) gone-from-code." in worker.output


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_a_no_scheduler_worker_fires_no_schedule_and_a_normal_one_does(backend, backend_alias):
    schedules.create("each-second", REPORT, every=1, args=["s"], backend=backend_alias)

    quiet = Worker(backend_alias, "--processes", "1", "--no-scheduler")
    try:
        ping = on(tasks.add, backend_alias).enqueue(1, 2)  # it takes jobs: it is running
        wait_for(lambda: job(ping).status == TaskResultStatus.SUCCESSFUL, timeout=30)
        time.sleep(2.5)  # "each-second" fell due twice at least meanwhile
        info = schedules.get("each-second", backend=backend_alias)
        assert info.runs == 0 and info.last_result_id is None
    finally:
        stop(quiet)

    worker = Worker(backend_alias, "--processes", "1")
    try:
        info = wait_for(
            lambda: (s := schedules.get("each-second", backend=backend_alias)).runs and s,
            timeout=30,
        )
        fired = backend.get_result(info.last_result_id)
        wait_for(lambda: job(fired).status == TaskResultStatus.SUCCESSFUL, timeout=30)
        assert job(fired).return_value == "s@"
    finally:
        stop(worker)
