"""The client of ``python -m bench killstorm``: one drain, calm or under a kill storm.

``python -m bench.storm_client MODE --tasks N --out FILE ...`` with the database in the
environment (``bench/settings.py``): enqueue N ``record_run`` tasks (``bench/app/runlog.py``),
start ``manage.py conveyor worker --processes P --until-done``, and time until the table
shows every job finished. With ``storm``, one worker child (never the supervisor) gets
SIGKILL every ``--kill-every`` seconds until then. Afterwards it counts the jobs not
succeeded and the runs per job from the run logs the task writes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

from bench.workers import WorkerGroup, worker_commands

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from conveyor.models import Job

POLL = 0.025  # seconds between looks at the table
OPEN_STATES = ("scheduled", "ready", "waiting", "running")
LOG_MARKERS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
MAX_LINES = 40  # worker log lines kept in the figures
MAX_IDS = 20  # job ids kept for each finding
PUT_BACK = re.compile(r"Put back (\d+) job\(s\), uncounted")

Figures = dict[str, Any]


def client_parser(module: str, modes: tuple[str, ...], tasks: int) -> argparse.ArgumentParser:
    """The arguments every drain client takes; ``module`` adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("mode", choices=modes)
    parser.add_argument("--tasks", type=int, default=tasks)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pidfile", type=Path, default=None)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = client_parser("bench.storm_client", ("calm", "storm"), tasks=10_000)
    parser.add_argument("--kill-every", type=float, default=0.5)
    return parser.parse_args(argv)


def enqueue(count: int) -> float:
    """Enqueue ``count`` runs of ``record_run`` in one bulk call; return the seconds taken."""
    from bench.app.runlog import record_run
    from conveyor import bulk_enqueue

    started = time.perf_counter()
    bulk_enqueue(record_run, [(i,) for i in range(count)])
    return time.perf_counter() - started


def unfinished() -> bool:
    from conveyor.models import Job

    return Job.objects.filter(state__in=OPEN_STATES).exists()


def kill_a_child(supervisor: int) -> int | None:
    """SIGKILL one child of the supervisor, chosen at random; its pid, or None if none."""
    try:
        children = psutil.Process(supervisor).children()
    except psutil.NoSuchProcess:
        return None
    if not children:
        return None
    victim = random.choice(children)
    try:
        victim.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return None
    return victim.pid


def drain(group: WorkerGroup, args: argparse.Namespace) -> tuple[float | None, list[Figures]]:
    """Wait until every job finished (killing children in a storm); seconds taken, kills."""
    assert group.started_at is not None
    started, kills = group.started_at, list[Figures]()
    next_kill = started + args.kill_every
    while (now := time.monotonic()) < started + args.timeout:
        if not unfinished():
            return now - started, kills
        if not group.alive():
            return None, kills
        if args.mode == "storm" and now >= next_kill:
            pid = kill_a_child(group.popens[0].pid)
            if pid is not None:
                kills.append({"at": round(now - started, 3), "pid": pid})
                next_kill = now + args.kill_every
        time.sleep(POLL)
    return None, kills


def read_runs(runlog: Path) -> dict[str, list[int]]:
    """The pids that ran each job, one entry per run."""
    runs: dict[str, list[int]] = {}
    for path in runlog.glob("*.log"):
        for job in path.read_text().split():
            runs.setdefault(job, []).append(int(path.stem))
    return runs


def rerun_after_kill(runs: dict[str, list[int]], kills: list[Figures]) -> int:
    """Jobs run more than once, one of those runs in a process that then got SIGKILL."""
    killed = {kill["pid"] for kill in kills}
    return sum(1 for pids in runs.values() if len(pids) > 1 and killed & set(pids))


def tally(pids: dict[str, list[int]], jobs: QuerySet[Job] | None = None) -> Figures:
    """Jobs not succeeded, runs per job, and deliveries as the table counts them.

    ``jobs``: the jobs to count (every job by default); ``pids`` should hold only theirs.
    """
    from conveyor.models import Job

    runs = Counter({job: len(ran) for job, ran in pids.items()})
    jobs = Job.objects.all() if jobs is None else jobs
    rows = list(jobs.values_list("uuid", "state", "attempts", "lost"))
    states = Counter(state for _, state, _, _ in rows)
    ids = {str(uuid) for uuid, *_ in rows}
    not_succeeded = [f"{uuid} ({state})" for uuid, state, _, _ in rows if state != "succeeded"]
    twice = sorted((n, job) for job, n in runs.items() if n > 1)[::-1]
    return {
        "jobs": len(rows),
        "states": dict(states),
        "not_succeeded": len(not_succeeded),
        "not_succeeded_ids": not_succeeded[:MAX_IDS],
        "runs": sum(runs.values()),
        "duplicate_runs": sum(n - 1 for n in runs.values() if n > 1),
        "jobs_run_twice_or_more": len(twice),
        "duplicate_ids": [f"{job} x{n}" for n, job in twice[:MAX_IDS]],
        "never_ran": len([job for job in ids if job not in runs]),
        "runs_of_unknown_jobs": len([job for job in runs if job not in ids]),
        "attempts_beyond_one": sum(max(a - 1, 0) for _, _, a, _ in rows),
        "lost_deliveries": sum(lost for *_, lost in rows),
    }


def log_lines(paths: list[Path]) -> list[str]:
    """Warnings and errors the workers logged."""
    found = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if any(marker in line for marker in LOG_MARKERS):
                found.append(line.strip())
    return found


def put_back_uncounted(lines: list[str]) -> int:
    """Jobs the supervisor put back uncounted (held, not executing, when a child died)."""
    return sum(int(m.group(1)) for line in lines if (m := PUT_BACK.search(line)))


def run_workers(
    args: argparse.Namespace,
    logdir: Path,
    drain: Callable[[WorkerGroup], Figures],
    expected: str | None = None,
) -> Figures:
    """Start the workers, let ``drain`` watch them, wait for them to exit; read their logs.

    ``drain`` returns figures with ``drain_seconds`` (None if the queue did not drain).
    Log lines that contain ``expected`` are counted apart from the other warnings.
    """
    with WorkerGroup(logdir, args.mode, supervised=True, pidfile=args.pidfile) as group:
        group.start(worker_commands("conveyor", args.processes, until_done=True))
        assert group.started_at is not None
        figures = drain(group)
        drained = figures.get("drain_seconds") is not None
        exited = group.wait_exit(args.timeout) if drained else None
        if exited is not None:
            figures["exit_seconds"] = exited - group.started_at
        figures["exit_codes"] = group.exit_codes()
    lines = log_lines(group.logs)
    others = [line for line in lines if not (expected and expected in line)]
    figures.update(
        put_back_uncounted=put_back_uncounted(lines),
        log_warnings=len(others),
        log_expected=len(lines) - len(others),
        log_lines=others[:MAX_LINES],
        logs=[str(p) for p in group.logs],
    )
    return figures


def run(args: argparse.Namespace, runlog: Path, logdir: Path) -> Figures:
    figures: Figures = {"mode": args.mode, "enqueue_seconds": enqueue(args.tasks)}

    def watch(group: WorkerGroup) -> Figures:
        took, kills = drain(group, args)
        return {"drain_seconds": took, "kills": len(kills), "kill_times": kills}

    figures.update(run_workers(args, logdir, watch))
    runs = read_runs(runlog)
    figures.update(tally(runs), rerun_after_kill=rerun_after_kill(runs, figures["kill_times"]))
    return figures


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through WorkerGroup.__exit__: workers stop


def prepare(out: Path) -> tuple[Path, Path]:
    """Set up Django and the run log the workers inherit; the run log and log directories."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    base = out.with_suffix("")
    runlog, logdir = Path(f"{base}-runs"), Path(f"{base}-logs")
    runlog.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_RUNLOG_DIR"] = str(runlog)  # the workers inherit it
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    return runlog, logdir


def client_main(
    argv: list[str] | None,
    parse: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace, Path, Path], Figures],
) -> int:
    """Parse ``argv``, set up, ``run`` the drain, and write its figures to ``--out``."""
    args = parse(argv)
    runlog, logdir = prepare(args.out)
    figures = run(args, runlog, logdir)
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return client_main(argv, parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
