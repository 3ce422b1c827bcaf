"""``python -m bench killstorm``: drain a queue while worker processes keep getting SIGKILL.

Run from the repository root::

    .venv/bin/python -m bench killstorm --quick                      # a smoke run
    .venv/bin/python -m bench killstorm --db sqlite,postgres --markdown bench/RESULTS.md

On each database, twice on a fresh migrated database: N tasks that note each run of
themselves (``bench/app/runlog.py``) are drained by ``manage.py conveyor worker
--processes 2 --until-done``, once undisturbed and once while one worker child (never the
supervisor) gets SIGKILL every 0.5 s until the table shows every job finished. See
``bench/storm_client.py`` for what is counted. Logs are kept under ``bench/out/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import sidebyside as sbs
from bench.databases import ENGINE_LABELS
from bench.workers import describe_commands

DATABASE = "conveyor_storm"  # on PostgreSQL, apart from the other runs' databases
MODES = ("calm", "storm")
LISTED = ("not_succeeded_ids", "duplicate_ids", "log_lines")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench killstorm", description=__doc__.split("\n\n")[0]
    )
    sbs.add_common_arguments(parser, timeout=600.0)
    parser.add_argument("--tasks", type=int, default=10_000, help="Tasks to drain (10000).")
    parser.add_argument("--processes", type=int, default=2, help="Worker processes (2).")
    parser.add_argument("--kill-every", type=float, default=0.5, help="Seconds between kills.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 1000 tasks.")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = 1000
    args.dbs = sbs.database_list(parser, args.db)
    return args


def client_argv(args: argparse.Namespace, mode: str) -> list[str]:
    return [
        "bench.storm_client",
        mode,
        f"--tasks={args.tasks}",
        f"--processes={args.processes}",
        f"--kill-every={args.kill_every}",
        f"--timeout={args.timeout}",
    ]


def measure(run: sbs.Invocation, args: argparse.Namespace, db: str) -> dict[str, Any]:
    argvs = {mode: client_argv(args, mode) for mode in MODES}
    return sbs.measure_modes(run, db, DATABASE, argvs, 2 * args.timeout + 120)


# --- the report ---------------------------------------------------------------------------


def _rate(figures: dict[str, Any], tasks: int) -> float | None:
    took = figures.get("drain_seconds")
    return tasks / took if took else None


ROWS = (
    ("Drain: workers start -> all finished (s)", "drain_seconds", True),
    ("Workers start -> supervisor exits (s)", "exit_seconds", True),
    ("SIGKILLs sent to worker children", "kills", False),
    ("Jobs not successful at the end (lost)", "not_succeeded", False),
    ("Runs beyond one per job (duplicates, from the run log)", "duplicate_runs", False),
    ("Jobs run more than once", "jobs_run_twice_or_more", False),
    ("... of which one run was in a process that got SIGKILL", "rerun_after_kill", False),
    ("Deliveries beyond one per job (`attempts` column)", "attempts_beyond_one", False),
    ("Deliveries lost to a dying worker (`lost` column)", "lost_deliveries", False),
    ("Jobs put back uncounted (held, not running, at a kill)", "put_back_uncounted", False),
    ("Jobs succeeded without a run in the log", "never_ran", False),
    ("Worker log lines at WARNING or above", "log_warnings", False),
)


def table(found: dict[str, Any], tasks: int) -> list[str]:
    calm, storm = found["calm"], found["storm"]
    rows = []
    for label, key, with_ratio in ROWS:
        a, b = calm.get(key), storm.get(key)
        rows.append([label, sbs.num(a), sbs.num(b), sbs.ratio(b, a) if with_ratio else ""])
    a, b = _rate(calm, tasks), _rate(storm, tasks)
    rows.insert(1, ["Drain throughput (tasks/s)", sbs.num(a, 0), sbs.num(b, 0), sbs.ratio(b, a)])
    return sbs.md_table(("Metric", "Undisturbed", "Kill storm", "Storm / undisturbed"), rows)


def verdicts(found: dict[str, Any]) -> list[str]:
    calm, storm = found["calm"], found["storm"]
    if "drain_seconds" not in storm or storm["drain_seconds"] is None:
        return ["- The storm run did not drain: " + "; ".join(storm.get("errors", ["timed out"]))]
    slower = storm["drain_seconds"] / calm["drain_seconds"] if calm.get("drain_seconds") else None
    checks = [
        (storm["not_succeeded"] == 0, f"lost jobs: {storm['not_succeeded']} (must be 0)"),
        (
            storm["duplicate_runs"] <= storm["kills"],
            f"duplicate runs {storm['duplicate_runs']} vs kills {storm['kills']} (must be no more)",
        ),
        (
            slower is not None and slower <= 2.0,
            f"storm drain {sbs.num(slower)}x undisturbed (aim: 2x)",
        ),
    ]
    return [f"- {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]


METHOD = """\
Each task appends its result id to a per-process run log (one `O_APPEND` write, which a
SIGKILL cannot undo). {tasks:,} of them are enqueued with `conveyor.bulk_enqueue` and
drained by `{workers}`, on a fresh migrated database, twice: undisturbed, and while the
client sends SIGKILL to one worker child chosen at random (never the supervisor) every
{every:g} s from {every:g} s after the start until the table shows no job open. Drain time:
workers start -> the table (polled every 25 ms) shows no job scheduled, ready or running.
Lost: jobs not `succeeded` at the end. Duplicates: run-log lines beyond one per job.
Aims: 0 lost, duplicates no more than kills, storm drain within 2x of undisturbed."""


def render(run: sbs.Invocation, args: argparse.Namespace, results: dict[str, Any]) -> str:
    command = " ".join([".venv/bin/python -m bench killstorm", *args.argv])
    workers = describe_commands("conveyor", args.processes, True)
    extra = [(f"{ENGINE_LABELS[db]}", found["version"]) for db, found in results.items()]
    extra.append(("Workers", f"`{workers}`"))
    method = METHOD.format(tasks=args.tasks, workers=workers, every=args.kill_every)
    out = [f"## Kill storm, {run.dir.name}", "", method, "", f"Command: `{command}`", ""]
    out += sbs.facts_table(sbs.machine_facts(run, extra))
    for db, found in results.items():
        out += ["", f"### {ENGINE_LABELS[db]}: {args.tasks:,} tasks", ""]
        out += [
            *table(found, args.tasks),
            "",
            *verdicts(found),
            *sbs.findings(found, MODES, LISTED),
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.argv = argv
    return sbs.run_per_database(
        sbs.Invocation("killstorm", args.conveyor_ref), args, measure, render
    )


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
