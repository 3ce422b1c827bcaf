"""``python -m bench scale``: claim latency, drain rate and pruning as the jobs table grows.

Run from the repository root::

    .venv/bin/python -m bench scale --quick              # a smoke run, about a minute
    .venv/bin/python -m bench scale --db sqlite,postgres --markdown bench/RESULTS.md

For each database and each size N, on a fresh migrated database: N ready jobs alone, then
N ready jobs beside a backlog of ``--backlog`` scheduled and as many finished jobs; see
``bench/scale_client.py`` for what is measured. ``--markdown`` adds a section to the end of
the file. Logs are kept under ``bench/out/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scale_report
from bench.databases import ENGINE_LABELS, ENGINES, engine
from bench.run import (
    command_line,
    conveyor_source,
    load_average,
    run_bounded,
    say,
    source_after,
    source_facts,
    source_fingerprint,
)
from bench.workers import BENCH_DIR, ROOT, kill_leftovers

DEFAULT_SIZES = {
    "sqlite": (10_000, 100_000, 1_000_000),
    "postgres": (10_000, 100_000, 1_000_000),
    "mysql": (10_000, 100_000),
}
QUICK = {"sizes": "2000,20000", "drain": 1000, "backlog": 20_000, "claims": 50, "rounds": 2}
FULL = {"drain": 10_000, "backlog": 1_000_000, "claims": 200, "rounds": 3}
DATABASE = "conveyor_scale"  # on PostgreSQL and MySQL, apart from the main run's


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench scale",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", default="sqlite,postgres", help="sqlite, postgres, mysql.")
    parser.add_argument(
        "--sizes",
        help="Comma-separated numbers of ready jobs (default: 10000,100000,1000000; "
        "10000,100000 on MySQL).",
    )
    parser.add_argument("--drain", type=int, help="Jobs the workers drain (10000).")
    parser.add_argument(
        "--backlog", type=int, help="Scheduled, and finished, jobs beside them (1000000; 0: none)."
    )
    parser.add_argument("--claims", type=int, help="Timed claims of 16 jobs per round (200).")
    parser.add_argument(
        "--rounds", type=int, help="Rounds of claims and drain on each database (3)."
    )
    parser.add_argument("--processes", type=int, default=2, help="Worker processes (2).")
    parser.add_argument("--quick", action="store_true", help="A smoke run with small sizes.")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="Longest wait for one step, in s (1800)."
    )
    parser.add_argument("--conveyor-ref", metavar="REF", help="Run Conveyor as of this commit.")
    parser.add_argument("--markdown", type=Path, help="Add the results to the end of this file.")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dbs = [db.strip() for db in args.db.split(",") if db.strip()]
    if not args.dbs or any(db not in ENGINES for db in args.dbs):
        parser.error(f"--db: choose from {', '.join(ENGINES)}")
    return args


def sizes(args: argparse.Namespace, db: str) -> list[int]:
    if args.sizes:
        return [int(size) for size in args.sizes.split(",")]
    return list(DEFAULT_SIZES[db])


class ScaleRun:
    """One invocation: where its logs go, and the Conveyor source its processes import."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = BENCH_DIR / "out" / datetime.now(UTC).strftime("scale-%Y%m%d-%H%M%S")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pidfile = self.dir / "worker-pids.txt"
        self.source, self.source_label = conveyor_source(args.conveyor_ref)

    def client(self, db: str, size: int, backlog: int, env: dict[str, str]) -> dict[str, Any]:
        """Measure one size on the fresh database ``env`` selects; its figures or its error."""
        a = self.args
        name = f"{db}-{size}-{backlog}"
        out, log = self.dir / f"{name}.json", self.dir / f"{name}.client.log"
        argv = [sys.executable, "-m", "bench.scale_client", "--size", str(size)]
        argv += ["--drain", str(min(a.drain, size)), "--backlog", str(backlog)]
        argv += ["--claims", str(a.claims), "--rounds", str(a.rounds)]
        argv += ["--processes", str(a.processes)]
        argv += ["--timeout", str(a.timeout), "--out", str(out), "--pidfile", str(self.pidfile)]
        argv += ["--logdir", str(self.dir / "logs" / name)]
        say(f"[{ENGINE_LABELS[db]}] {size:,} ready, backlog {backlog:,} ...")
        started = time.monotonic()
        try:
            code = run_bounded(argv, env, log, timeout=4 * a.timeout)
        finally:
            kill_leftovers(self.pidfile)
        say(f"    done in {time.monotonic() - started:.0f}s (exit code {code})")
        base = {"size": size, "backlog": backlog}
        if code != 0 or not out.exists():
            return base | {"error": f"failed (exit code {code}); see {log.relative_to(ROOT)}"}
        return base | json.loads(out.read_text())

    def database(self, db: str) -> tuple[str, list[dict[str, Any]]]:
        """The server version and every measurement on ``db``."""
        eng = engine(db, "none", self.source, database=DATABASE)
        found = []
        try:
            eng.prepare()
            version = eng.version()
            for size in sizes(self.args, db):
                for backlog in sorted({0, self.args.backlog}):
                    with eng.fresh() as env:
                        found.append(self.client(db, size, backlog, env))
        finally:
            eng.close()
        return version, found

    def close(self) -> None:
        if self.source != ROOT / "src":
            import shutil

            shutil.rmtree(self.source.parent, ignore_errors=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    load_before = load_average()
    run = ScaleRun(args)
    source_before = (run.source_label, source_fingerprint(run.source))
    results: dict[str, list[dict[str, Any]]] = {}
    versions: dict[str, str] = {}
    try:
        for db in args.dbs:
            versions[db], results[db] = run.database(db)
        sources = source_facts(source_before, (source_after(run), source_fingerprint(run.source)))
    finally:
        kill_leftovers(run.pidfile)
        run.close()
    (run.dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(scale_report.render_text(results))
    if args.markdown:
        facts = scale_report.machine_facts(versions, sources, load_before, load_average())
        command = command_line(["scale", *argv])
        section = scale_report.render_markdown(results, args, command, facts, started)
        with args.markdown.open("a") as f:
            f.write("\n" + section)
        say(f"Added the scale run to {args.markdown}")
    return 1 if any("error" in r for per in results.values() for r in per) else 0
