"""The benchmark's client: one phase of one system against one fresh, migrated database.

``python -m bench`` runs it as ``python -m bench.client PHASE --system SYSTEM ...`` with the
database in the environment (see ``bench/settings.py``); it writes its figures as JSON to
``--out``. Phases:

``drain``: enqueue ``--tasks`` no-op tasks one by one (timed), then start the workers and
time until the database shows every one finished.
``bulk``: enqueue ``--tasks`` tasks with ``conveyor.bulk_enqueue`` (Conveyor only).
``latency``: start idle workers, then ``--latency`` times: enqueue one task and poll its
row every millisecond until it finished (then, with ``--latency-gap G``, pause a random
G to 2G seconds); then idle CPU and memory of the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench.workers import SYSTEMS, WorkerGroup, idle_cpu_percent, memory, worker_commands

POLL_DRAIN = 0.025  # seconds between looks at the table while a queue drains
POLL_LATENCY = 0.001  # seconds between looks at one result row
WARMUP_TASKS = 2
SAMPLE_TIMEOUT = 60.0  # longest one latency sample may take

Figures = dict[str, Any]


@dataclass(frozen=True, slots=True)
class States:
    """The field of a row that holds its state, and the values the benchmark looks for."""

    column: str
    open: tuple[str, ...]  # not finished yet
    ready: str
    succeeded: str
    failed: str


# django-tasks-db, and Conveyor before it had states of its own (``--conveyor-ref``).
DJANGO_STATUSES = States("status", ("READY", "RUNNING"), "READY", "SUCCESSFUL", "FAILED")
CONVEYOR_STATES = States(
    "state", ("scheduled", "ready", "waiting", "running"), "ready", "succeeded", "failed"
)


@dataclass(frozen=True, slots=True)
class Subject:
    """One system under test: its task, its rows, their states, the field of a result id."""

    system: str
    task: Any  # django.tasks.Task
    rows: Callable[[], Any]  # a QuerySet of this backend's rows
    states: States
    key: str

    def unfinished(self) -> Any:
        return self.rows().filter(**{f"{self.states.column}__in": self.states.open})


def subject(system: str) -> Subject:
    """The no-op task of ``system`` and where its results are stored."""
    from bench.app.tasks import noop_conveyor, noop_tasksdb

    if system == "conveyor":
        return Subject(system, noop_conveyor, _conveyor_rows, _conveyor_states(), "uuid")
    return Subject(system, noop_tasksdb, _tasksdb_rows, DJANGO_STATUSES, "id")


def _conveyor_rows() -> Any:
    from conveyor.models import Job

    return Job.objects.filter(backend_name="conveyor")


def _conveyor_states() -> States:
    """Conveyor's states, or Django's statuses for an older Conveyor (``--conveyor-ref``)."""
    from conveyor.models import Job

    names = {field.name for field in Job._meta.get_fields()}
    return CONVEYOR_STATES if "state" in names else DJANGO_STATUSES


def _tasksdb_rows() -> Any:
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult.objects.filter(backend_name="tasksdb")


# --- enqueueing ---------------------------------------------------------------------------


def enqueue_one_by_one(s: Subject, count: int) -> Figures:
    """``task.enqueue(i)`` in a loop, each in its own transaction (autocommit)."""
    started = time.perf_counter()
    for i in range(count):
        s.task.enqueue(i)
    took = time.perf_counter() - started
    _expect_rows(s, count)
    return {"enqueue_one_seconds": took, "enqueue_one_rate": count / took}


def enqueue_bulk(s: Subject, count: int) -> Figures:
    """One ``conveyor.bulk_enqueue`` call with ``count`` calls."""
    from conveyor import bulk_enqueue

    calls = [(i,) for i in range(count)]
    started = time.perf_counter()
    bulk_enqueue(s.task, calls)
    took = time.perf_counter() - started
    _expect_rows(s, count)
    return {"enqueue_bulk_seconds": took, "enqueue_bulk_rate": count / took}


def _expect_rows(s: Subject, count: int) -> None:
    stored = s.rows().filter(**{s.states.column: s.states.ready}).count()
    if stored != count:
        raise RuntimeError(f"{s.system}: {stored} ready rows after enqueueing {count}")


# --- draining ------------------------------------------------------------------------------


def phase_drain(s: Subject, args: argparse.Namespace, group: WorkerGroup) -> Figures:
    figures = enqueue_one_by_one(s, args.tasks)
    until_done = s.system == "conveyor"
    group.start(worker_commands(s.system, args.processes, until_done=until_done))
    assert group.started_at is not None
    finished_at = wait_all_finished(s, group, args.timeout)
    if until_done and finished_at is not None:
        exited_at = group.wait_exit(args.timeout)
        if exited_at is not None:
            figures["worker_exit_seconds"] = exited_at - group.started_at
    group.stop()
    figures["exit_codes"] = group.exit_codes()
    if finished_at is not None:
        took = finished_at - group.started_at
        figures.update(drain_seconds=took, drain_rate=args.tasks / took)
    figures.update(table_figures(s, args.tasks))
    return figures


def wait_all_finished(s: Subject, group: WorkerGroup, timeout: float) -> float | None:
    """Poll the table until no job is ready or running; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = group.alive()
        if not s.unfinished().exists():
            return time.monotonic()
        if not alive:
            return None  # every worker exited with work left: a failure, reported as such
        time.sleep(POLL_DRAIN)
    return None


def table_figures(s: Subject, total: int) -> Figures:
    """Counts by state and the span from the first start to the last finish, from rows."""
    from django.db.models import Count, Max, Min

    counts = dict(s.rows().values_list(s.states.column).annotate(n=Count("pk")).order_by())
    span = s.rows().aggregate(first=Min("started_at"), last=Max("finished_at"))
    figures: Figures = {
        "statuses": counts,
        "successful": counts.get(s.states.succeeded, 0),
        "failed": counts.get(s.states.failed, 0),
    }
    if span["first"] is not None and span["last"] is not None:
        seconds = (span["last"] - span["first"]).total_seconds()
        figures.update(db_span_seconds=seconds, db_span_rate=total / max(seconds, 1e-9))
    return figures


# --- latency, idle CPU and memory ---------------------------------------------------------------


def phase_latency(s: Subject, args: argparse.Namespace, group: WorkerGroup) -> Figures:
    group.start(worker_commands(s.system, args.processes, until_done=False))
    for i in range(WARMUP_TASKS):  # the workers are up and have run a task
        run_one(s, -1 - i, min(args.timeout, SAMPLE_TIMEOUT))
    time.sleep(args.settle)
    samples = []
    for i in range(args.latency):
        samples.append(run_one(s, i, min(args.timeout, SAMPLE_TIMEOUT)))
        if args.latency_gap:
            # Random, so that the pauses never fall into step with a worker's poll timer.
            time.sleep(random.uniform(args.latency_gap, 2 * args.latency_gap))
    time.sleep(args.settle)
    processes = group.processes()
    figures: Figures = {
        "latency_samples": len(samples),
        "latency_failed": sum(1 for *_, ok in samples if not ok),
        "idle_cpu_percent": idle_cpu_percent(processes, args.idle_seconds),
        "memory": memory(processes),
    }
    figures["pickup_samples"] = [pickup for pickup, _, _, _ in samples]
    figures["stored_samples"] = [stored for _, stored, _, _ in samples]
    figures["wall_samples"] = [wall for _, _, wall, _ in samples]
    figures.update(percentiles("pickup", figures["pickup_samples"]))
    figures.update(percentiles("stored", figures["stored_samples"]))
    figures.update(percentiles("wall", figures["wall_samples"]))
    group.stop()
    figures["exit_codes"] = group.exit_codes()
    return figures


def run_one(s: Subject, i: int, timeout: float) -> tuple[float, float, float, bool]:
    """Enqueue one task and wait until its row says it finished.

    Return the stored pickup ``started_at - enqueued_at`` and ``finished_at - enqueued_at``,
    the wall time the client saw from before ``enqueue()`` to the poll that saw it finished
    (all in seconds), and success.
    """
    started = time.perf_counter()
    result = s.task.enqueue(i)
    deadline = started + timeout
    while time.perf_counter() < deadline:
        row = list(
            s.rows()
            .filter(**{s.key: result.id})
            .values_list(s.states.column, "enqueued_at", "started_at", "finished_at")
        )
        if row and row[0][0] not in s.states.open:
            wall = time.perf_counter() - started
            status, enqueued_at, started_at, finished_at = row[0]
            return (
                (started_at - enqueued_at).total_seconds(),
                (finished_at - enqueued_at).total_seconds(),
                wall,
                status == s.states.succeeded,
            )
        time.sleep(POLL_LATENCY)
    raise TimeoutError(f"{s.system}: task {result.id} did not finish within {timeout}s")


def percentiles(name: str, values: list[float]) -> Figures:
    """p50, p99 and max of ``values`` (seconds), as ``{name}_p50`` etc."""
    if not values:
        return {}
    if len(values) == 1:
        return {f"{name}_p50": values[0], f"{name}_p99": values[0], f"{name}_max": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        f"{name}_p50": statistics.median(values),
        f"{name}_p99": cuts[98],
        f"{name}_max": max(values),
    }


# --- the command -----------------------------------------------------------------------------


def phase_bulk(s: Subject, args: argparse.Namespace, group: WorkerGroup) -> Figures:
    if s.system != "conveyor":
        raise ValueError("only Conveyor has a bulk enqueue API")
    return enqueue_bulk(s, args.tasks)


PHASES: dict[str, Callable[[Subject, argparse.Namespace, WorkerGroup], Figures]] = {
    "drain": phase_drain,
    "bulk": phase_bulk,
    "latency": phase_latency,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--latency", type=int, default=20)
    parser.add_argument("--latency-gap", type=float, default=0.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--pidfile", type=Path, default=None)
    return parser.parse_args(argv)


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through WorkerGroup.__exit__: workers stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    s = subject(args.system)
    label = f"{args.phase}-{args.system}"
    with WorkerGroup(
        args.logdir, label, supervised=args.system == "conveyor", pidfile=args.pidfile
    ) as group:
        figures = PHASES[args.phase](s, args, group)
        figures["worker_logs"] = [str(log) for log in group.logs]
    import conveyor

    figures["conveyor_module"] = conveyor.__file__
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
