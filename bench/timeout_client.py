"""The client of ``python -m bench timeouts``: one drain, with or without overrunning tasks.

``python -m bench.timeout_client MODE --tasks N --out FILE ...`` with the database in the
environment (``bench/settings.py``). ``storm``: N jobs in one queue, every ``--every``-th
of them (spread evenly) an ``overrun`` task that sleeps ``--sleep`` s under a hard limit of
``--limit`` s, the others ``record_run`` (``bench/app/runlog.py``). ``baseline``: only the
same healthy jobs. Then ``manage.py conveyor worker --processes P --until-done`` drains
them (``bench/storm_client.py``) while the table is polled for when the healthy jobs, and
all jobs, are finished. Afterwards it counts the healthy jobs not succeeded and run more
than once, and how long past its limit each overrunning job was stopped.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path
from typing import Any

from bench.e2e_client import percentiles
from bench.storm_client import (
    OPEN_STATES,
    POLL,
    client_main,
    client_parser,
    read_runs,
    run_workers,
    tally,
)
from bench.workers import WorkerGroup

TIME_LIMIT = "conveyor.exceptions.TimeLimitExceeded"
LIMIT_LOGGED = "past its time limit"  # in what the supervisor logs of a time-limit stop
WITHIN = 1.0  # aim: each overrunning job is stopped at most this long past its limit, s
MAX_IDS = 20

Figures = dict[str, Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = client_parser("bench.timeout_client", ("baseline", "storm"), tasks=1000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--limit", type=float, default=1.0)
    parser.add_argument("--sleep", type=float, default=30.0)
    return parser.parse_args(argv)


def spread(tasks: int, every: int) -> list[bool]:
    """The storm's queue in order: True for an overrunning job, every ``every``-th one."""
    return [i % every == every // 2 for i in range(tasks)]


def plan(args: argparse.Namespace) -> list[bool]:
    """The queue in order, True for an overrunning job; the baseline keeps the others."""
    slow = spread(args.tasks, args.every)
    return slow if args.mode == "storm" else [False] * slow.count(False)


def enqueue(args: argparse.Namespace) -> float:
    """Enqueue the plan, in order, one bulk call per stretch of one kind; the seconds taken."""
    from bench.app.runlog import overrun, record_run
    from conveyor import bulk_enqueue

    limited = overrun.using(timeout=args.limit)
    started = time.perf_counter()
    for slow, stretch in itertools.groupby(enumerate(plan(args)), key=lambda item: item[1]):
        numbers = [i for i, _ in stretch]
        if slow:
            bulk_enqueue(limited, [(i, args.sleep) for i in numbers])
        else:
            bulk_enqueue(record_run, [(i,) for i in numbers])
    return time.perf_counter() - started


def open_jobs() -> tuple[int, int]:
    """Jobs not finished: the healthy ones, and all."""
    from django.db.models import Count, Q

    from bench.app.runlog import record_run
    from conveyor.models import Job

    counts = Job.objects.filter(state__in=OPEN_STATES).aggregate(
        healthy=Count("id", filter=Q(task_path=record_run.module_path)), all=Count("id")
    )
    return counts["healthy"], counts["all"]


def drain(group: WorkerGroup, timeout: float) -> Figures:
    """Wait until every job finished; when the healthy ones, and all, were (s from start)."""
    assert group.started_at is not None
    started, healthy_done = group.started_at, None
    while (now := time.monotonic()) < started + timeout:
        healthy, everything = open_jobs()
        if healthy == 0 and healthy_done is None:
            healthy_done = now - started
        if everything == 0:
            return {"healthy_seconds": healthy_done, "drain_seconds": now - started}
        if not group.alive():
            break
        time.sleep(POLL)
    return {"healthy_seconds": healthy_done, "drain_seconds": None}


def stopped_late(args: argparse.Namespace) -> Figures:
    """Overrunning jobs: how each ended, and how long past its limit it was stopped."""
    from bench.app.runlog import overrun
    from conveyor.models import Job

    rows = Job.objects.filter(task_path=overrun.module_path).values_list(
        "uuid", "state", "errors", "last_attempted_at", "finished_at"
    )
    past, other = [], []
    for uuid, state, errors, started, finished in rows:
        error = errors[-1]["exception_class_path"] if errors else None
        if state == "failed" and error == TIME_LIMIT and started and finished:
            past.append((finished - started).total_seconds() - args.limit)
        else:
            other.append(f"{uuid} ({state}, {error})")
    found = {f"past_limit_{k}": v for k, v in percentiles(past).items()}
    return {
        "overrun_jobs": len(rows),
        "time_limit_failures": len(past),
        "stopped_within": sum(1 for late in past if late <= WITHIN),
        "past_limit_all": sorted(past),
        "not_time_limited_ids": other[:MAX_IDS],
        **found,
    }


def run(args: argparse.Namespace, runlog: Path, logdir: Path) -> Figures:
    from bench.app.runlog import overrun, record_run
    from conveyor.models import Job

    figures: Figures = {"mode": args.mode, "limit": args.limit, "enqueue_seconds": enqueue(args)}
    watch = functools.partial(drain, timeout=args.timeout)
    figures.update(run_workers(args, logdir, watch, expected=LIMIT_LOGGED))
    runs = read_runs(runlog)
    slow = {
        str(u)
        for u in Job.objects.filter(task_path=overrun.module_path).values_list("uuid", flat=True)
    }
    healthy = Job.objects.filter(task_path=record_run.module_path)
    figures.update(tally({job: pids for job, pids in runs.items() if job not in slow}, healthy))
    figures.update(stopped_late(args), overrun_runs=sum(len(runs.get(job, [])) for job in slow))
    return figures


def main(argv: list[str] | None = None) -> int:
    return client_main(argv, parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
