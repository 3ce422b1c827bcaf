"""Real ``manage.py conveyor worker`` processes: running, dying, stopping, sharing."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections, transaction
from django.tasks import TaskResultStatus
from django.utils import timezone

import conveyor
from conveyor.models import Job
from tests.helpers import Worker, job, lines, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance


def status(result) -> str:  # type: ignore[no-untyped-def]
    return job(result).status


def test_until_done_runs_everything_and_exits(backend, backend_alias):
    results = conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, i) for i in range(60)])
    failing = on(tasks.explode, backend_alias).enqueue("bad input")
    coro = on(tasks.async_add, backend_alias).enqueue(20, 22)
    ctx = on(tasks.whoami, backend_alias).enqueue()

    worker = Worker(backend_alias, "--processes", "2", "--until-done")
    assert worker.wait() == 0, worker.output

    for i, result in enumerate(results):
        result.refresh()
        assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 2 * i
    failing.refresh()
    assert failing.status == TaskResultStatus.FAILED
    assert "ValueError: bad input" in failing.errors[0].traceback
    coro.refresh()
    assert coro.return_value == 42
    ctx.refresh()
    assert ctx.return_value["id"] == ctx.id and ctx.return_value["attempt"] == 1
    assert ctx.return_value["worker_ids"] == ctx.worker_ids
    assert len({w for r in results for w in job(r).worker_ids}) >= 1


def test_sigkill_of_a_worker_process_loses_nothing(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "victim", sleep=1.0)
    with Worker(backend_alias, "--processes", "1") as worker:
        first = wait_for(lambda: [line for line in lines(log) if line.startswith("start")])
        os.kill(int(first[0].split()[-1]), signal.SIGKILL)
        wait_for(lambda: status(result) == TaskResultStatus.SUCCESSFUL, timeout=20)
        worker.signal()
        assert worker.wait() == 0

    result.refresh()
    assert result.attempts == 2
    assert result.errors[0].exception_class_path == "conveyor.exceptions.WorkerLost"
    assert "SIGKILL" in result.errors[0].traceback
    starts = [line for line in lines(log) if line.startswith("start")]
    ends = [line for line in lines(log) if line.startswith("end")]
    assert len(starts) == 2 and len(ends) == 1
    # The log names the job and its task, and why it runs again.
    assert f"Job {result.id} (tests.testapp.tasks.log_line) runs again" in worker.output
    assert "killed by signal SIGKILL" in worker.output


def test_first_signal_finishes_running_tasks_and_exits_zero(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    running = on(tasks.log_line, backend_alias).enqueue(str(log), "running", sleep=1.0)
    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: lines(log))
        waiting = on(tasks.log_line, backend_alias).enqueue(str(log), "waiting")
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output

    running.refresh()
    assert running.status == TaskResultStatus.SUCCESSFUL
    assert lines(log)[-1].startswith("end running")
    assert status(waiting) == TaskResultStatus.READY
    assert job(waiting).attempts == 0


def test_second_signal_stops_tasks_and_puts_their_jobs_back(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "long", sleep=30)
    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: lines(log))
        started = time.monotonic()
        worker.signal(signal.SIGINT)
        time.sleep(0.3)
        worker.signal(signal.SIGINT)
        code = worker.wait(timeout=10)
    assert time.monotonic() - started < 10
    assert code != 0

    row = job(result)
    assert row.status == TaskResultStatus.READY
    assert "stopped before the task finished" in row.errors[-1].traceback
    assert not any(line.startswith("end") for line in lines(log))


def test_grace_period_ends_a_graceful_stop(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "long", sleep=30)
    with Worker(backend_alias, "--processes", "1", "--grace", "0.5") as worker:
        wait_for(lambda: lines(log))
        worker.signal(signal.SIGTERM)
        worker.wait(timeout=10)
    assert status(result) == TaskResultStatus.READY


def test_two_workers_never_run_the_same_job(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    conveyor.bulk_enqueue(
        on(tasks.log_line, backend_alias),
        [conveyor.call(str(log), f"job{i}", sleep=0.05) for i in range(100)],
    )
    first = Worker(backend_alias, "--processes", "2", "--until-done")
    second = Worker(backend_alias, "--processes", "2", "--threads", "2", "--until-done")
    assert first.wait() == 0, first.output
    assert second.wait() == 0, second.output

    starts = [line.split()[1] for line in lines(log) if line.startswith("start")]
    assert sorted(starts) == sorted(f"job{i}" for i in range(100))
    db = connections[backend.database].alias
    attempts = dict(Job.objects.using(db).values_list("uuid", "attempts"))
    assert set(attempts.values()) == {1}, (attempts, first.output, second.output)
    owners = {w for ids in Job.objects.using(db).values_list("worker_ids", flat=True) for w in ids}
    supervisors = {owner.rsplit(":", 1)[0] for owner in owners}
    assert len(supervisors) == 2  # each supervisor ran some of the jobs


def test_a_vanished_machine_s_jobs_are_taken_over(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "orphan", sleep=0.5)
    lost = Worker(backend_alias, "--processes", "1", options={"LEASE": 1.0})
    try:
        wait_for(lambda: lines(log))
        lost.kill_group()
    finally:
        lost.stop()
    assert status(result) == TaskResultStatus.RUNNING

    with Worker(backend_alias, "--processes", "1", options={"LEASE": 1.0}) as rescuer:
        wait_for(lambda: status(result) == TaskResultStatus.SUCCESSFUL, timeout=20)
        rescuer.signal()
        rescuer.wait()
    result.refresh()
    assert result.attempts == 2
    assert "lease expired" in result.errors[0].traceback


def test_priorities_and_run_after_with_a_real_worker(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    task = on(tasks.log_line, backend_alias)
    due = timezone.now() + timedelta(seconds=1.5)
    later = task.using(run_after=due).enqueue(str(log), "later")
    task.using(priority=-10).enqueue(str(log), "low")
    task.enqueue(str(log), "normal")
    task.using(priority=10).enqueue(str(log), "high")

    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: status(later) == TaskResultStatus.SUCCESSFUL)
        worker.signal()
        worker.wait()
    order = [line.split()[1] for line in lines(log) if line.startswith("start")]
    assert order == ["high", "normal", "low", "later"]
    assert job(later).started_at >= due


def test_jobs_naming_missing_or_unregistered_code_fail_and_the_worker_goes_on(
    backend, backend_alias
):
    base = on(tasks.add, backend_alias)
    gone = base.enqueue(1, 1)
    plain = base.enqueue(2, 2)
    good = base.enqueue(3, 3)
    db = backend.database
    Job.objects.using(db).filter(uuid=gone.id).update(task_path="tests.testapp.tasks.vanished")
    Job.objects.using(db).filter(uuid=plain.id).update(
        task_path="tests.testapp.tasks.plain_function"
    )

    worker = Worker(backend_alias, "--processes", "1", "--until-done")
    assert worker.wait() == 0, worker.output

    gone_row, plain_row = job(gone), job(plain)
    assert gone_row.status == plain_row.status == TaskResultStatus.FAILED
    assert "'tests.testapp.tasks.vanished' cannot be imported" in gone_row.errors[0].traceback
    assert "not a task" in plain_row.errors[0].traceback
    assert gone_row.errors[0].exception_class_path == "conveyor.exceptions.TaskNotFound"
    good.refresh()
    assert good.return_value == 6


def test_a_bad_return_value_fails_the_task_clearly(backend, backend_alias):
    result = on(tasks.bad_return, backend_alias).enqueue()
    assert Worker(backend_alias, "--processes", "1", "--until-done").wait() == 0
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert "must be JSON-serialisable" in result.errors[0].traceback


def test_only_committed_enqueues_run(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    task = on(tasks.log_line, backend_alias)
    with pytest.raises(RuntimeError), transaction.atomic(using=backend.database):
        task.enqueue(str(log), "rolled-back")
        raise RuntimeError
    with transaction.atomic(using=backend.database):
        task.enqueue(str(log), "committed")

    assert Worker(backend_alias, "--processes", "1", "--until-done").wait() == 0
    assert [line.split()[1] for line in lines(log)] == ["committed", "committed"]


def test_max_tasks_per_child_recycles_processes(backend, backend_alias):
    results = [on(tasks.add, backend_alias).enqueue(i, 1) for i in range(5)]
    worker = Worker(backend_alias, "--processes", "1", "--max-tasks-per-child", "2", "--until-done")
    assert worker.wait() == 0, worker.output
    owners = {job(r).worker_ids[0] for r in results}
    assert len(owners) == 3
    assert all(job(r).status == TaskResultStatus.SUCCESSFUL for r in results)


def test_threads_run_tasks_side_by_side(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    conveyor.bulk_enqueue(
        on(tasks.log_line, backend_alias),
        [conveyor.call(str(log), f"t{i}", sleep=0.4) for i in range(4)],
    )
    worker = Worker(backend_alias, "--processes", "1", "--threads", "4", "--until-done")
    assert worker.wait() == 0, worker.output
    events = [line.split()[0] for line in lines(log)]
    assert events[:4] == ["start"] * 4  # all four began before any ended


def test_bad_command_line_is_refused_with_a_clear_error(backend_alias):
    worker = Worker(backend_alias, "--queue", "nowhere")
    assert worker.wait() != 0
    assert "Unknown queue(s) 'nowhere'" in worker.output
    worker = Worker(backend_alias, "--queue", "emails", "--exclude-queue", "default")
    assert worker.wait() != 0
    assert "cannot be combined" in worker.output
    worker = Worker("immediate")
    assert worker.wait() != 0
    assert "not a Conveyor backend" in worker.output


def drop_other_connections(backend) -> int:  # type: ignore[no-untyped-def]
    """Cut every other session to the test database, as a database restart would."""
    conn = connections[backend.database]
    name = conn.settings_dict["NAME"]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            return int(cursor.fetchone()[0])
        cursor.execute(
            "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
            [name],
        )
        ids = [row[0] for row in cursor.fetchall()]
        for pid in ids:
            cursor.execute(f"KILL {int(pid)}")
        return len(ids)


@pytest.mark.parametrize("engine", ["postgres", "mysql"], indirect=True)
def test_the_worker_recovers_from_dropped_database_connections(backend, backend_alias):
    first = on(tasks.add, backend_alias).enqueue(1, 1)
    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: status(first) == TaskResultStatus.SUCCESSFUL)
        assert drop_other_connections(backend) >= 1
        second = on(tasks.add, backend_alias).enqueue(2, 2)
        wait_for(lambda: status(second) == TaskResultStatus.SUCCESSFUL, timeout=20)
        third = on(tasks.add, backend_alias).enqueue(3, 3)
        wait_for(lambda: status(third) == TaskResultStatus.SUCCESSFUL, timeout=20)
        worker.signal()
        assert worker.wait() == 0, worker.output


def test_busy_workers_and_writers_never_hit_a_locked_database(backend, backend_alias):
    conveyor.bulk_enqueue(on(tasks.fan_out, backend_alias), [(5, backend_alias) for _ in range(60)])
    with Worker(backend_alias, "--processes", "3", "--threads", "2") as worker:
        for i in range(100):  # enqueue from here too while the workers write
            on(tasks.add, backend_alias).enqueue(i, i)
        wait_for(lambda: backend.stats().finished == 60 + 300 + 100, timeout=60)
        worker.signal()
        assert worker.wait() == 0, worker.output
    stats = backend.stats()
    assert stats.successful == 460 and stats.failed == 0
    assert "locked" not in worker.output.lower()
    assert "Traceback" not in worker.output


def test_a_graceful_stop_saves_what_finishes_while_waiting(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    task = on(tasks.log_line, backend_alias)
    short = task.enqueue(str(log), "short", sleep=0.8)
    long = task.enqueue(str(log), "long", sleep=30)
    with Worker(backend_alias, "--processes", "1", "--threads", "2", "--grace", "3") as worker:
        wait_for(lambda: len(lines(log)) >= 2)
        worker.signal(signal.SIGTERM)
        worker.wait(timeout=15)
    assert status(short) == TaskResultStatus.SUCCESSFUL
    assert status(long) == TaskResultStatus.READY


def test_worker_processes_die_with_their_supervisor(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    on(tasks.log_line, backend_alias).enqueue(str(log), "orphan", sleep=30)
    with Worker(backend_alias, "--processes", "1") as worker:
        child = int(wait_for(lambda: lines(log))[0].split()[-1])
        worker.signal(signal.SIGKILL)  # the supervisor only
        wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=5)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
