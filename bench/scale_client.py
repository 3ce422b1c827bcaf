"""The scale run's client: one size of queue on one fresh, migrated database.

``python -m bench scale`` runs it as ``python -m bench.scale_client --size N ...`` with the
database in the environment (see ``bench/settings.py``) and reads its figures, written as
JSON to ``--out``. In order:

1. with ``--backlog B``: insert B scheduled jobs (due in a year, ranked above every other
   job) and B jobs that succeeded 30 days ago, with set-based SQL;
2. ``bulk_enqueue`` N ready no-op jobs, the first ``--drain`` D of them at a higher
   priority than the rest (timed);
3. claim latency: ``--claims`` times ``backend.claim(worker, QueueSelector(), 16)``, each
   claim given back (untimed) with ``backend.unclaim()``;
4. drain: start ``manage.py conveyor worker --processes P`` and time until the D jobs are
   finished (the rest would keep the workers busy), then stop the workers with SIGTERM;
   steps 3 and 4 are repeated ``--rounds`` times, the D jobs made ready again in between;
5. with a backlog: ``backend.prune()`` of everything finished over a day ago, while a
   writer thread enqueues, claims and completes a job every 5 ms (see ``bench/probe.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import fill
from bench.client import exit_on_sigterm, percentiles
from bench.workers import WorkerGroup, worker_commands

CLAIM_LIMIT = 16
CLAIM_WORKER = "bench-claims"
WARMUP_CLAIMS = 3
POLL = 0.025  # seconds between looks at the table while the workers drain
BEFORE_PRUNE = 2.0  # seconds the writer runs alone before the prune starts
PRUNE_OLDER_THAN = timedelta(days=1)
FINISHED = "('succeeded', 'failed', 'cancelled')"

Figures = dict[str, Any]


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def time_claims(count: int) -> tuple[list[float], int]:
    """Time ``count`` claims of 16 jobs, each given back untimed so the queue stays the same.

    Return the times, and how many claims took fewer jobs, or other jobs, than expected.
    """
    from django.tasks import task_backends

    from conveyor.records import QueueSelector

    backend = task_backends["conveyor"]
    for _ in range(WARMUP_CLAIMS):
        backend.unclaim(backend.claim(CLAIM_WORKER, QueueSelector(), CLAIM_LIMIT))
    samples, odd = [], 0
    for _ in range(count):
        started = time.perf_counter()
        jobs = backend.claim(CLAIM_WORKER, QueueSelector(), CLAIM_LIMIT)
        samples.append(time.perf_counter() - started)
        odd += len(jobs) < CLAIM_LIMIT or any(j.priority != fill.DRAIN_PRIORITY for j in jobs)
        backend.unclaim(jobs)
    return samples, odd


def _fetch(sql: str, params: list[Any], rows: bool = True) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if rows else []


def drain_ids(count: int) -> tuple[int, int]:
    """The first and last id of the ``count`` jobs the drain measures (one run of ids)."""
    [(low, high, found)] = _fetch(
        "SELECT MIN(id), MAX(id), COUNT(*) FROM conveyor_job WHERE state = 'ready' "
        "AND backend_name = 'conveyor' AND priority = %s",
        [fill.DRAIN_PRIORITY],
    )
    if found != count or high - low + 1 != count:
        raise RuntimeError(f"expected {count} drain jobs with ids in one run, found {found}")
    return low, high


def measure_drain(args: argparse.Namespace, group: WorkerGroup, low: int, high: int) -> Figures:
    """Time real workers through the jobs ``low..high``, ranked first."""
    group.start(worker_commands("conveyor", args.processes, until_done=False))
    assert group.started_at is not None
    finished_at = wait_drained(low, high, group, args.timeout)
    group.stop()
    figures: Figures = {"exit_codes": group.exit_codes()}
    if finished_at is not None:
        figures["drain_rate"] = args.drain / (finished_at - group.started_at)
    return figures | drained_rows(low, high)


def reset_drained(low: int, high: int) -> None:
    """Make the jobs ``low..high`` ready again, as they were before the drain."""
    never = ", ".join(
        f"{column} = NULL"
        for column in ("started_at", "last_attempted_at", "finished_at", "return_value")
    )
    empty, params = fill.sql_value([])
    _fetch(
        f"UPDATE conveyor_job SET state = 'ready', attempts = 0, {never}, worker_ids = {empty}, "
        "lease_owner = NULL, lease_expires_at = NULL, delivery = '' "
        "WHERE id BETWEEN %s AND %s",
        [*params, low, high],
        rows=False,
    )


def wait_drained(low: int, high: int, group: WorkerGroup, timeout: float) -> float | None:
    """Poll until no job in ``low..high`` is unfinished; return when (monotonic)."""
    sql = (
        f"SELECT 1 FROM conveyor_job WHERE id BETWEEN %s AND %s AND state NOT IN {FINISHED} LIMIT 1"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = group.alive()
        if not _fetch(sql, [low, high]):
            return time.monotonic()
        if not alive:
            return None  # the workers exited with work left: reported as a failure
        time.sleep(POLL)
    return None


def drained_rows(low: int, high: int) -> Figures:
    """States of the drained jobs, and the rate from the first start to the last finish."""
    from django.db.models import Count, Max, Min

    from conveyor.models import Job

    rows = Job.objects.filter(pk__range=(low, high))
    states = dict(rows.values_list("state").annotate(n=Count("pk")).order_by())
    span = rows.aggregate(first=Min("started_at"), last=Max("finished_at"))
    figures: Figures = {"states": states}
    if span["first"] is not None and span["last"] is not None:
        seconds = (span["last"] - span["first"]).total_seconds()
        figures["drain_span_rate"] = (high - low + 1) / seconds
    return figures


def measure_rounds(args: argparse.Namespace) -> Figures:
    """Claims, then a drain, ``--rounds`` times; claim times pooled, drain rates listed."""
    low, high = drain_ids(args.drain)
    claims, odd, drains = [], 0, []
    for number in range(1, args.rounds + 1):
        if number > 1:
            reset_drained(low, high)
        _say(f"round {number}: {args.claims} claims, then draining {args.drain:,} jobs")
        samples, round_odd = time_claims(args.claims)
        claims, odd = claims + samples, odd + round_odd
        label = f"scale-{args.size}-{args.backlog}-{number}"
        with WorkerGroup(args.logdir, label, supervised=True, pidfile=args.pidfile) as group:
            drains.append(measure_drain(args, group, low, high) | {"logs": group.logs})
    figures: Figures = {"claims": len(claims), "claims_odd": odd, "drain": args.drain}
    figures |= percentiles("claim", claims)
    for key in ("drain_rate", "drain_span_rate"):
        values = [d[key] for d in drains if key in d]
        figures[f"{key}s"] = values
        if len(values) == len(drains):  # a median only if every round finished
            figures[key] = statistics.median(values)
    figures["drain_states"] = [d["states"] for d in drains]
    figures["worker_logs"] = [str(log) for d in drains for log in d["logs"]]
    return figures


def measure_prune(expected: int) -> Figures:
    """Prune the finished backlog while a writer works; time each batch and each write."""
    from django.tasks import task_backends
    from django.utils import timezone

    from bench.probe import Writer, timed_deletes, timed_transactions

    backend = task_backends["conveyor"]
    holds: list[float] = []
    deletes: list[float] = []
    writer = Writer()
    writer.start()
    try:
        time.sleep(BEFORE_PRUNE)
        writer.phase = "prune"
        with timed_transactions(holds), timed_deletes(deletes):
            started = time.perf_counter()
            pruned = backend.prune(timezone.now() - PRUNE_OLDER_THAN)
            took = time.perf_counter() - started
    finally:
        writer.stop()
    if writer.error is not None:
        raise RuntimeError("the writer thread failed") from writer.error
    figures: Figures = {"pruned": pruned, "prune_expected": expected, "prune_seconds": took}
    figures.update(prune_rate=pruned / took, prune_batches=len(holds))
    figures.update(writer_ops=len(writer.seconds("prune")), writer_longest=writer.longest("prune"))
    figures |= percentiles("prune_hold", holds) | percentiles("prune_delete", deletes)
    figures |= percentiles("writer_before", writer.seconds("before"))
    return figures | percentiles("writer_prune", writer.seconds("prune"))


def fill_database(args: argparse.Namespace) -> Figures:
    from conveyor.models import Job

    if "state" not in {field.name for field in Job._meta.get_fields()}:
        raise SystemExit("The scale run needs Conveyor's own job states (Job.state).")
    figures: Figures = {"size": args.size}
    if args.backlog:
        _say(f"inserting {args.backlog:,} scheduled and {args.backlog:,} finished jobs")
        figures |= fill.insert_backlog(args.backlog)
    _say(f"enqueueing {args.size:,} ready jobs")
    figures |= fill.enqueue_ready(args.size, args.drain)
    fill.analyze()
    figures["rows"] = Job.objects.count()
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_client")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--drain", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=0)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--pidfile", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    figures = fill_database(args)
    _say(f"{figures['rows']:,} rows")
    figures |= measure_rounds(args)
    if args.backlog:
        _say(f"pruning {args.backlog:,} finished jobs")
        figures |= measure_prune(args.backlog)
    import conveyor

    figures["conveyor_module"] = conveyor.__file__
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
