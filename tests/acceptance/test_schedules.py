"""Schedules fired by many real workers at once: each due time once, supervisors killed too."""

from __future__ import annotations

import itertools
import os
import random
import select
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from conveyor import schedules
from conveyor.models import ScheduleFiring
from tests.helpers import Worker, lines, wait_for

pytestmark = pytest.mark.acceptance

LINE = "tests.testapp.tasks.scheduled_line"
SUPERVISORS, PROCESSES = 8, 4  # 32 worker processes, every supervisor firing schedules


def declare(alias: str, log: Path) -> list[str]:
    """Three schedules due every second or two; each run appends "label due" to ``log``.

    Each catches up every missed due time, so that a due time not fired shows as a gap.
    """
    made = [
        ("each-second", {"every": 1}),
        ("every-two", {"every": 2}),
        ("cron-seconds", {"cron": "* * * * * *"}),
    ]
    for name, timing in made:
        schedules.create(
            name,
            LINE,
            args=[str(log), name],
            due_kwarg="due",
            catch_up="all",
            backend=alias,
            **timing,
        )
    return [name for name, _ in made]


def fired(log: Path) -> dict[str, dict[datetime, set[str]]]:
    """For each schedule, the jobs that ran for each of its due times."""
    runs: dict[str, dict[datetime, set[str]]] = {}
    for line in lines(log):
        name, due, job_id = line.split(" ")
        runs.setdefault(name, {}).setdefault(datetime.fromisoformat(due), set()).add(job_id)
    return runs


def assert_each_due_time_once(backend, log: Path, names: list[str], *, all_ran: bool = True) -> int:  # type: ignore[no-untyped-def]
    """Check each due time fired one job, with no due time skipped; return the runs repeated.

    The firings are read from their table: a job whose process was killed may not have
    run again yet when the workers stop (its lease has not run out), so with ``all_ran``
    off the log only has to agree with them. A job runs again only when the process
    running it was killed (at-least-once delivery); a due time with two jobs would be a
    schedule firing twice.
    """
    runs = fired(log)
    for name in names:
        firings = list(
            ScheduleFiring.objects.using(backend.database)
            .filter(schedule__name=name, on_demand=False)
            .values_list("due_at", "result_id")
        )
        dues = {due: str(result_id) for due, result_id in firings}
        assert len(dues) == len(firings) >= 3, (name, firings)
        ordered = sorted(dues)
        step = 2 if name == "every-two" else 1
        gaps = [(a, b) for a, b in itertools.pairwise(ordered) if (b - a).total_seconds() != step]
        assert gaps == [], f"{name}: due times skipped between {gaps}"
        info = schedules.get(name, backend=backend.alias)
        assert info.runs == len(dues) and info.last_run_at == ordered[-1]
        ran = runs.get(name, {})
        doubled = {due: jobs for due, jobs in ran.items() if len(jobs) > 1}
        assert doubled == {}, f"{name}: due times fired twice: {doubled}"
        assert all(jobs == {dues[due]} for due, jobs in ran.items()), (name, ran, dues)
        if all_ran:
            assert set(ran) == set(dues), f"{name}: runs that never ran: {set(dues) - set(ran)}"
    seen = Counter(line.rsplit(" ", 1)[1] for line in lines(log))
    return sum(count - 1 for count in seen.values())


def start(alias: str, count: int) -> list[Worker]:
    return [
        Worker(alias, "--processes", str(PROCESSES), options={"LEASE": 10.0}) for _ in range(count)
    ]


def stop(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=30)


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_many_workers_fire_each_due_time_once(backend, backend_alias, tmp_path: Path):
    log = tmp_path / "runs.log"
    names = declare(backend_alias, log)
    workers = start(backend_alias, SUPERVISORS)
    try:
        wait_for(
            lambda: all(len(v) >= 4 for v in fired(log).values()) and len(fired(log)) == 3,
            timeout=60,
            every=0.2,
        )
        time.sleep(2)
    finally:
        stop(workers)
    # Jobs fired just before the stop may still be waiting: run them with one worker.
    finisher = Worker(backend_alias, "--processes", "1", "--until-done", "--no-scheduler")
    assert finisher.wait(timeout=60) == 0, finisher.output
    assert assert_each_due_time_once(backend, log, names) == 0  # nothing ran twice
    for worker in workers:
        assert "Traceback" not in worker.output, worker.output


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_supervisors_killed_mid_tick_neither_lose_nor_double_a_due_time(
    backend, backend_alias, tmp_path: Path
):
    log = tmp_path / "runs.log"
    names = declare(backend_alias, log)
    workers = start(backend_alias, SUPERVISORS)
    try:
        wait_for(lambda: len(fired(log)) == 3, timeout=60, every=0.1)
        victims = random.sample(workers, 3)
        for victim in victims:  # at random moments of their ticks, with their children
            time.sleep(random.uniform(0.3, 1.2))
            victim.kill_group()
        count = len(lines(log))
        wait_for(lambda: len(lines(log)) >= count + 9, timeout=30, every=0.1)
    finally:
        for victim in workers:
            if victim.proc.poll() is not None:
                victim.wait(timeout=5)
        stop([w for w in workers if w.proc.poll() is None])
    finisher = Worker(backend_alias, "--processes", "1", "--until-done", "--no-scheduler")
    assert finisher.wait(timeout=60) == 0, finisher.output
    assert_each_due_time_once(backend, log, names, all_ran=False)


HANG_INSIDE_A_FIRING = """
import os, sys, time
from django.tasks import task_backends
backend = task_backends[sys.argv[1]]
insert_runs = backend._insert_runs

def insert_then_hang(rows, period):
    stored = insert_runs(rows, period)
    print("INSIDE", stored[0].uuid, flush=True)
    time.sleep(600)  # killed here: the job is written, not committed

backend._insert_runs = insert_then_hang
backend.fire_schedules()
"""


def read_until(proc: subprocess.Popen, start: str, timeout: float) -> str:
    """What ``proc`` printed, up to the first line starting with ``start``."""
    assert proc.stdout is not None
    said, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        line = proc.stdout.readline() if ready else ""
        said += line
        if line.startswith(start) or (ready and not line):
            break
    return said


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"], indirect=True)
def test_a_firer_killed_inside_its_transaction_leaves_its_due_time_to_others(
    backend, backend_alias, tmp_path: Path
):
    script = tmp_path / "hang.py"
    script.write_text(HANG_INSIDE_A_FIRING)
    schedules.create(
        "due-now",
        LINE,
        args=[str(tmp_path / "x"), "x"],
        every=3600,
        run_at_creation=True,
        backend=backend_alias,
    )
    firer = Worker(backend_alias)  # for its environment: the test databases
    firer.stop()
    env_args = firer.args[:2]
    hung = subprocess.Popen(
        [
            *env_args,
            "shell",
            "-c",
            f"import runpy, sys; sys.argv = ['x', {backend_alias!r}]; "
            f"runpy.run_path({str(script)!r})",
        ],
        env=firer.env,
        cwd=firer.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        said = read_until(hung, "INSIDE", timeout=30)
        assert said.splitlines()[-1].startswith("INSIDE"), said
        # While it holds the schedule, another firer skips it (or, on SQLite, waits its turn).
        if backend.vendor != "sqlite":
            assert backend.fire_schedules() == []
    finally:
        if hung.poll() is None:
            os.killpg(hung.pid, signal.SIGKILL)
        hung.communicate(timeout=10)
    [fired] = wait_for(backend.fire_schedules, timeout=30, every=0.2)
    assert fired.schedule == "due-now" and fired.result_id is not None
    assert backend.fire_schedules() == []
    info = schedules.get("due-now", backend=backend_alias)
    assert info.runs == 1 and info.last_result_id == fired.result_id
    assert backend.stats().pending == 1  # the killed firer's job was never committed
