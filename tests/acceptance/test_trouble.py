"""Real workers in trouble: refused values, crashes, slow tasks, lost replies, outages."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from django.db import connections
from django.tasks import TaskResultStatus

import conveyor
from conveyor.models import Job
from conveyor.records import QueueSelector
from tests.contract.stores import with_options
from tests.helpers import Worker, job, lines, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance


def held_by(backend, worker_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Ids of the jobs ``worker_id`` holds right now (read from the table)."""
    rows = Job.objects.using(backend.database).filter(state="running", lease_owner=worker_id)
    return [str(u) for u in rows.values_list("uuid", flat=True)]


def test_a_value_the_database_refuses_fails_that_job_alone(backend, backend_alias, engine):
    before = conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, 1) for i in range(5)])
    refused = on(tasks.nul_return, backend_alias).enqueue()
    after = conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, 2) for i in range(35)])

    worker = Worker(backend_alias, "--processes", "1", "--until-done")
    assert worker.wait() == 0, worker.output

    for result in [*before, *after]:
        assert job(result).status == TaskResultStatus.SUCCESSFUL
    outcome = job(refused)
    if engine == "postgres":  # jsonb cannot hold \u0000; the others store it faithfully
        assert outcome.status == TaskResultStatus.FAILED
        [error] = outcome.errors
        assert error.exception_class_path == "conveyor.exceptions.OutcomeRefused"
        assert "the database refused the outcome" in error.traceback
        assert "\\u0000" in error.traceback  # the database's own message
        assert f"Job {refused.id} (tests.testapp.tasks.nul_return)" in worker.output
    else:
        assert outcome.status == TaskResultStatus.SUCCESSFUL
        assert outcome.return_value == "a\x00b"
    assert backend.stats().pending == 0


def test_a_crash_counts_only_the_job_that_was_running(backend, backend_alias):
    noop = on(tasks.add, backend_alias)
    first = conveyor.bulk_enqueue(noop, [(i, 0) for i in range(20)])
    poison = on(tasks.kill_self, backend_alias).enqueue()
    rest = conveyor.bulk_enqueue(noop, [(i, 1) for i in range(10)])

    worker = Worker(backend_alias, "--processes", "1", "--until-done", options={"MAX_ATTEMPTS": 2})
    assert worker.wait(timeout=60) == 0, worker.output

    failed = job(poison)
    assert failed.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in failed.errors] == ["conveyor.exceptions.WorkerLost"] * 2
    assert "killed by signal SIGKILL" in failed.errors[-1].traceback
    assert "lost 2 times" in failed.errors[-1].traceback
    for result in [*first, *rest]:
        done = job(result)
        assert done.status == TaskResultStatus.SUCCESSFUL and done.errors == [], done
        assert done.attempts == 1  # put back uncounted, if it was held at all
    assert f"Job {poison.id} (tests.testapp.tasks.kill_self) runs again" in worker.output
    # A child killed while working is replaced at once, not after a crash backoff.
    assert "before it was ready" not in worker.output


def test_a_crash_runs_nothing_again_that_had_finished(backend, backend_alias, tmp_path: Path):
    # The jobs just before the crash had returned, their outcomes waiting for the next
    # group commit: the supervisor saves them from the dead process's slots.
    log = tmp_path / "log"
    noop = on(tasks.log_line, backend_alias)
    before = conveyor.bulk_enqueue(noop, [(str(log), f"n{i}") for i in range(30)])
    poison = on(tasks.kill_self, backend_alias).enqueue()

    worker = Worker(backend_alias, "--processes", "1", "--until-done", options={"MAX_ATTEMPTS": 1})
    assert worker.wait(timeout=60) == 0, worker.output

    assert job(poison).status == TaskResultStatus.FAILED
    starts = [line.split()[1] for line in lines(log) if line.startswith("start")]
    assert sorted(starts) == sorted(f"n{i}" for i in range(30)), worker.output
    for result in before:
        done = job(result)
        assert done.status == TaskResultStatus.SUCCESSFUL and done.attempts == 1, done
        assert done.return_value == result.args[1]
    # Usually some outcomes were still waiting at the crash ("Saved N outcome(s) a dead
    # worker process had finished"); on a slower store the last batch may have been saved
    # before the poison job was claimed. Either way nothing ran twice.


def test_a_slow_task_holds_no_other_job(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    noop = on(tasks.add, backend_alias)
    conveyor.bulk_enqueue(noop, [(i, 0) for i in range(300)])
    slow = on(tasks.log_line, backend_alias).enqueue(str(log), "slow", sleep=3.0)
    conveyor.bulk_enqueue(noop, [(i, 1) for i in range(300)])

    with Worker(backend_alias, "--processes", "2") as worker:
        wait_for(lambda: lines(log))
        time.sleep(0.5)  # ten times the prefetch horizon
        [owner] = job(slow).worker_ids
        assert held_by(backend, owner) == [slow.id]
        # The other process drains everything else meanwhile.
        wait_for(lambda: backend.stats().pending <= 1, timeout=2.0)
        wait_for(lambda: job(slow).status == TaskResultStatus.SUCCESSFUL, timeout=10)
        worker.signal()
        assert worker.wait() == 0, worker.output
    assert backend.stats().successful == 601


def test_processes_a_task_starts_can_be_stopped(backend, backend_alias, tmp_path: Path):
    pid_file = tmp_path / "pid"
    result = on(tasks.run_child_process, backend_alias).enqueue(str(pid_file))
    with Worker(backend_alias, "--processes", "1") as worker:
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text()))
        status = Path(f"/proc/{pid}/status").read_text()
        blocked = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
        assert int(blocked.split()[1], 16) == 0, blocked
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL, timeout=5)
        worker.signal()
        assert worker.wait() == 0, worker.output
    assert job(result).return_value == -signal.SIGTERM


def test_a_lost_claim_reply_goes_back_within_two_leases(backend, backend_alias):
    # The worker serves 'default' only, so the job stays put once it is given back.
    with Worker(backend_alias, "--processes", "1", "--queue", "default") as worker:
        child = wait_for(lambda: [w for w in backend.workers() if w.kind == "process"])[0]
        result = on(tasks.add, backend_alias, queue_name="reports").enqueue(4, 4)
        # A claim that committed under the live child's name, whose reply it never got.
        reports = QueueSelector(include=frozenset({"reports"}))
        [lost] = with_options(backend_alias, lease=1.0).claim(child.id, reports, 1)
        claimed_at = time.monotonic()
        wait_for(lambda: job(result).status == TaskResultStatus.READY, timeout=10)
        took = time.monotonic() - claimed_at
        worker.signal()
        assert worker.wait() == 0, worker.output
    assert lost.id == result.id
    assert 1.0 < took < 2 * 1.0 + 1.0  # two leases, plus a beat
    back = job(result)
    assert back.errors == [] and back.attempts == 0  # given back uncounted
    assert f"Gave back job {result.id} (tests.testapp.tasks.add)" in worker.output


def test_sighup_stops_as_gracefully_as_sigterm(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "running", sleep=1.0)
    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: lines(log))
        os.killpg(worker.pid, signal.SIGHUP)  # a closed terminal: the whole group gets it
        assert worker.wait() == 0, worker.output
    assert job(result).status == TaskResultStatus.SUCCESSFUL
    assert lines(log)[-1].startswith("end running")


def test_children_claim_nothing_while_their_supervisor_is_late(backend, backend_alias):
    # Nobody would renew what a child claimed while its supervisor is stopped: the lease
    # would run out under a running task, and another machine would run it again.
    first = on(tasks.add, backend_alias).enqueue(1, 1)
    with Worker(backend_alias, "--processes", "1", options={"LEASE": 1.0}) as worker:
        wait_for(lambda: job(first).status == TaskResultStatus.SUCCESSFUL)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            time.sleep(0.8)  # past two thirds of the lease since the last beat
            later = conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, i) for i in range(5)])
            time.sleep(0.5)
            assert [job(r).status for r in later] == [TaskResultStatus.READY] * 5
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        for result in later:
            wait_for(lambda r=result: job(r).status == TaskResultStatus.SUCCESSFUL)
            assert job(result).attempts == 1
        worker.signal()
        assert worker.wait() == 0, worker.output


def test_a_task_s_open_transaction_never_holds_the_worker_s_writes(backend, backend_alias):
    left_open = on(tasks.begin_and_leave_open, backend_alias).enqueue()
    after = conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, i) for i in range(5)])
    worker = Worker(backend_alias, "--processes", "1", "--until-done")
    assert worker.wait() == 0, worker.output
    assert job(left_open).status == TaskResultStatus.SUCCESSFUL
    for result in after:  # visible to this process: committed, not stuck in a transaction
        assert job(result).status == TaskResultStatus.SUCCESSFUL


def test_a_worker_on_an_unmigrated_database_says_so_and_exits(tmp_path: Path, backend_alias):
    if backend_alias != "default":
        pytest.skip("one engine shows it")
    empty = tmp_path / "empty.sqlite3"
    worker = Worker("default", "--processes", "1", names={"default": str(empty)})
    assert worker.wait(timeout=20) == 2, worker.output
    assert "run `python manage.py migrate`" in worker.output
    assert "Traceback" not in worker.output


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_an_outage_longer_than_the_lease_reruns_nothing(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "through", sleep=2.5)
    runner = Worker(backend_alias, "--processes", "1")
    other = None
    try:
        wait_for(lambda: lines(log))
        # Another machine, idle: started once the runner holds the job, so it runs there.
        other = Worker(backend_alias, "--processes", "1")
        with outage(backend, seconds=3.0):  # three leases without the database
            pass
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL, timeout=20)
        time.sleep(1.5)  # a recovery round of both supervisors after the outage
    finally:
        for worker in (runner, other):
            if worker is not None:
                worker.signal()
                worker.wait()
    assert other is not None
    starts = [line for line in lines(log) if line.startswith("start")]
    assert len(starts) == 1, runner.output + other.output
    done = job(result)
    assert done.errors == [] and done.attempts == 1
    assert "Traceback" not in runner.output + other.output
    assert "The store answers again" in runner.output


class outage:
    """Cut every session to the test database and refuse new ones for ``seconds``.

    Done from the server's maintenance database: PostgreSQL will not close the database
    a session is connected to.
    """

    def __init__(self, backend, seconds: float) -> None:  # type: ignore[no-untyped-def]
        self.alias = backend.database
        settings = connections[backend.database].settings_dict
        self.name = settings["NAME"]
        self.params = {"host": settings["HOST"], "port": settings["PORT"], "user": settings["USER"]}
        self.seconds = seconds

    def _sql(self, sql: str, params: list[object] | None = None) -> None:
        import psycopg

        with psycopg.connect(dbname="postgres", autocommit=True, **self.params) as conn:
            conn.execute(sql, params)

    def __enter__(self) -> outage:
        self._sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self._sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [self.name],
        )
        time.sleep(self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        self._sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
        connections[self.alias].close()  # this test's own session was cut too


def test_jobs_waiting_behind_a_task_that_holds_the_interpreter_go_back(
    backend, backend_alias, tmp_path: Path
):
    # The child's own watchdog cannot run while the task holds the GIL: the supervisor
    # gives back the jobs waiting behind it. (Outcomes already finished stay held until the
    # task ends: giving those back would run them twice.)
    log = tmp_path / "log"
    neighbour = on(tasks.log_line, backend_alias)
    before = conveyor.bulk_enqueue(neighbour, [(str(log), f"b{i}") for i in range(100)])
    held = on(tasks.hold_interpreter, backend_alias).enqueue(str(log), 4.0)
    after = conveyor.bulk_enqueue(neighbour, [(str(log), f"a{i}") for i in range(100)])
    label = {r.id: r.args[1] for r in [*before, *after]}

    def only_run_jobs_held() -> bool:
        owner = job(held).worker_ids[-1]
        started = {line.split()[1] for line in lines(log) if line.startswith("start")}
        return all(label[j] in started for j in held_by(backend, owner) if j != held.id)

    with Worker(backend_alias, "--processes", "2") as worker:
        wait_for(lambda: any(line.startswith("start hold") for line in lines(log)))
        time.sleep(1.5)  # past the supervisor's one second, and a tick
        assert only_run_jobs_held()
        wait_for(lambda: job(held).status == TaskResultStatus.SUCCESSFUL, timeout=15)
        wait_for(lambda: backend.stats().pending == 0, timeout=15)
        worker.signal()
        assert worker.wait() == 0, worker.output
    assert backend.stats().successful == 201


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_connection_cut_while_a_task_runs_fails_nothing(backend, backend_alias, tmp_path):
    log = tmp_path / "log"
    result = on(tasks.log_line, backend_alias).enqueue(str(log), "cut", sleep=1.5)
    with Worker(backend_alias, "--processes", "1") as worker:
        wait_for(lambda: lines(log))
        with outage(backend, seconds=0.0):  # every session cut; reconnecting works at once
            pass
        wait_for(lambda: job(result).status != TaskResultStatus.RUNNING, timeout=15)
        worker.signal()
        assert worker.wait() == 0, worker.output
    done = job(result)
    assert done.status == TaskResultStatus.SUCCESSFUL, done.errors
    assert done.errors == [] and done.attempts == 1
    assert len([line for line in lines(log) if line.startswith("start")]) == 1
