"""``python -m bench timeouts``: drain a queue in which some tasks run past a hard time limit.

Run from the repository root::

    .venv/bin/python -m bench timeouts --quick                       # a smoke run
    .venv/bin/python -m bench timeouts --db sqlite,postgres --markdown bench/RESULTS.md

On each database, twice on a fresh migrated database, drained by ``manage.py conveyor
worker --processes 2 --until-done``: a timeout storm of N jobs, every tenth of them a task
that sleeps far past its hard limit (``timeout=1.0``) and the rest short tasks that note
each run (``bench/app/runlog.py``); and a baseline of the same short tasks alone. See
``bench/timeout_client.py`` for what is counted. Logs are kept under ``bench/out/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import sidebyside as sbs
from bench.databases import ENGINE_LABELS
from bench.timeout_client import WITHIN, spread
from bench.workers import describe_commands

DATABASE = "conveyor_timeouts"  # on PostgreSQL, apart from the other runs' databases
MODES = ("baseline", "storm")
LISTED = ("not_succeeded_ids", "duplicate_ids", "not_time_limited_ids", "log_lines")
KEPT = 0.8  # aim: the healthy jobs drain at no less than this times the baseline rate
MS = 1000.0

Figures = dict[str, Any]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench timeouts", description=__doc__.split("\n\n")[0]
    )
    sbs.add_common_arguments(parser, timeout=600.0)
    parser.add_argument("--tasks", type=int, default=1000, help="Jobs in the storm (1000).")
    parser.add_argument("--every", type=int, default=10, help="One job in this many overruns.")
    parser.add_argument("--limit", type=float, default=1.0, help="Their hard limit, s (1).")
    parser.add_argument("--sleep", type=float, default=30.0, help="How long they sleep, s (30).")
    parser.add_argument("--processes", type=int, default=2, help="Worker processes (2).")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 200 jobs.")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = 200
    if args.every < 2 or args.sleep <= args.limit + WITHIN:
        parser.error("--every must be 2 or more, --sleep well past --limit")
    args.dbs = sbs.database_list(parser, args.db)
    return args


def client_argv(args: argparse.Namespace, mode: str) -> list[str]:
    return [
        "bench.timeout_client",
        mode,
        f"--tasks={args.tasks}",
        f"--every={args.every}",
        f"--limit={args.limit}",
        f"--sleep={args.sleep}",
        f"--processes={args.processes}",
        f"--timeout={args.timeout}",
    ]


def measure(run: sbs.Invocation, args: argparse.Namespace, db: str) -> Figures:
    argvs = {mode: client_argv(args, mode) for mode in MODES}
    return sbs.measure_modes(run, db, DATABASE, argvs, 2 * args.timeout + 120)


# --- the report ---------------------------------------------------------------------------


def _rate(figures: Figures) -> float | None:
    took, jobs = figures.get("healthy_seconds"), figures.get("jobs")
    return jobs / took if took and jobs else None


def _ms(figures: Figures, key: str) -> float | None:
    value = figures.get(key)
    return None if value is None else value * MS


ROWS = (  # label, key; a ratio column for the drain times
    ("Healthy jobs", "jobs"),
    ("Overrunning jobs", "overrun_jobs"),
    ("... ended FAILED with `TimeLimitExceeded`", "time_limit_failures"),
    (f"... stopped within {WITHIN:g} s of their limit", "stopped_within"),
    ("... runs of them (run log)", "overrun_runs"),
    ("Healthy jobs not successful (lost)", "not_succeeded"),
    ("Healthy runs beyond one per job (duplicates, from the run log)", "duplicate_runs"),
    ("Healthy jobs run more than once", "jobs_run_twice_or_more"),
    ("Healthy jobs succeeded without a run in the log", "never_ran"),
    ("Healthy deliveries lost to a dying worker (`lost` column)", "lost_deliveries"),
    ("Jobs put back uncounted (held beside an overrunning task)", "put_back_uncounted"),
    ("Worker log lines at WARNING or above about a time limit", "log_expected"),
    ("Other worker log lines at WARNING or above", "log_warnings"),
)
TIMES = (
    ("Healthy drain: workers start -> healthy jobs finished (s)", "healthy_seconds"),
    ("Workers start -> all jobs finished (s)", "drain_seconds"),
    ("Workers start -> supervisor exits (s)", "exit_seconds"),
)
LATE = (
    ("Past the limit when stopped, p50 (ms)", "past_limit_p50"),
    ("Past the limit when stopped, p99 (ms)", "past_limit_p99"),
    ("Past the limit when stopped, max (ms)", "past_limit_max"),
)


def table(found: Figures, args: argparse.Namespace) -> list[str]:
    base, storm = found["baseline"], found["storm"]
    rows = [
        [label, sbs.num(base.get(k)), sbs.num(storm.get(k)), sbs.ratio(storm.get(k), base.get(k))]
        for label, k in TIMES
    ]
    a, b = _rate(base), _rate(storm)
    rows.insert(
        1, ["Healthy drain throughput (jobs/s)", sbs.num(a, 0), sbs.num(b, 0), sbs.ratio(b, a)]
    )
    floor = storm.get("overrun_jobs", 0) * args.limit / args.processes
    rows.append(["Overrunning jobs x limit / processes (s, arithmetic)", "", sbs.num(floor), ""])
    rows += [[label, sbs.num(base.get(k)), sbs.num(storm.get(k)), ""] for label, k in ROWS]
    rows += [[label, "", sbs.num(_ms(storm, k), 1), ""] for label, k in LATE]
    return sbs.md_table(("Metric", "Baseline", "Timeout storm", "Storm / baseline"), rows)


def verdicts(found: Figures, args: argparse.Namespace) -> list[str]:
    base, storm = found["baseline"], found["storm"]
    if storm.get("drain_seconds") is None or base.get("healthy_seconds") is None:
        errors = storm.get("errors", []) + base.get("errors", [])
        return ["- A run did not drain: " + "; ".join(errors or ["timed out"])]
    slow = spread(args.tasks, args.every).count(True)
    stopped, late = storm["stopped_within"], sbs.num(_ms(storm, "past_limit_max"), 0)
    counts = [storm[k] for k in ("not_succeeded", "duplicate_runs", "never_ran")]
    kept = sbs.ratio(_rate(storm), _rate(base))
    checks = [
        (
            storm["time_limit_failures"] == stopped == storm["overrun_jobs"] == slow,
            f"overrunning jobs failed with `TimeLimitExceeded` within {WITHIN:g} s of their "
            f"limit: {stopped} of {slow} (the latest {late} ms past it)",
        ),
        (
            counts == [0, 0, 0],
            "healthy jobs succeeded exactly once: lost {}, duplicate runs {}, succeeded "
            "without a run {} (each must be 0)".format(*counts),
        ),
        (
            (_rate(storm) or 0) >= KEPT * (_rate(base) or float("inf")),
            f"healthy drain rate {kept} the baseline's (aim: {KEPT:.2f}x or more)",
        ),
    ]
    return [f"- {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]


METHOD = """\
Timeout storm: {tasks:,} jobs enqueued in one queue with `conveyor.bulk_enqueue`, in order;
one in {every} of them (the {middle}th of every {every}, so spread evenly) a task with a hard
limit of `timeout={limit:g}` s that notes its run and then sleeps {sleep:g} s; the others a
task that notes each run of itself in a per-process run log (one `O_APPEND` write) and
returns. Baseline: the same {healthy:,} short jobs alone. Each drained by `{workers}` on a
fresh migrated database. Healthy drain: workers start -> the table (polled every 25 ms)
shows no short job scheduled, ready or running; throughput is short jobs / that time. Past
the limit: `finished_at - last_attempted_at - {limit:g} s` of each job that ended FAILED
with `TimeLimitExceeded`. Lost: short jobs not `succeeded`; duplicates: run-log lines
beyond one per short job. The arithmetic row is the worker time the overrunning jobs take
by design, spread over the processes. Aims: every overrunning job ends with a time-limit
error within {within:g} s of its limit; every other job succeeds exactly once; healthy
drain rate within {slower:.0%} of the baseline's."""


def render(run: sbs.Invocation, args: argparse.Namespace, results: dict[str, Figures]) -> str:
    command = " ".join([".venv/bin/python -m bench timeouts", *args.argv])
    workers = describe_commands("conveyor", args.processes, True)
    extra = [(f"{ENGINE_LABELS[db]}", found["version"]) for db, found in results.items()]
    extra.append(("Workers", f"`{workers}`"))
    healthy = spread(args.tasks, args.every).count(False)
    method = METHOD.format(
        tasks=args.tasks,
        every=args.every,
        middle=args.every // 2 + 1,
        limit=args.limit,
        sleep=args.sleep,
        healthy=healthy,
        workers=workers,
        within=WITHIN,
        slower=1 - KEPT,
    )
    out = [f"## Timeouts, {run.dir.name}", "", method, "", f"Command: `{command}`", ""]
    out += sbs.facts_table(sbs.machine_facts(run, extra))
    for db, found in results.items():
        out += ["", f"### {ENGINE_LABELS[db]}: {args.tasks:,} jobs, {healthy:,} healthy", ""]
        out += [*table(found, args), "", *verdicts(found, args)]
        out += sbs.findings(found, MODES, LISTED)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.argv = argv
    return sbs.run_per_database(
        sbs.Invocation("timeouts", args.conveyor_ref), args, measure, render
    )


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
