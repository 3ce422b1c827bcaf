"""Benchmark Conveyor's DatabaseBackend against django-tasks-db's, side by side.

Run from the repository root::

    .venv/bin/python -m bench --quick                 # a smoke run, under a minute
    .venv/bin/python -m bench --db sqlite,postgres --tasks 10000 --latency 200 \\
        --markdown bench/RESULTS.md                   # the full run

(``python bench/run.py ...`` works too.) Every phase runs in a fresh, migrated database;
workers are real ``manage.py`` subprocesses; figures go to stdout and, with ``--markdown``,
to a Markdown file. Worker and client logs are kept under ``bench/out/``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

if not __package__:  # run as ``python bench/run.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.databases import ENGINE_LABELS, ENGINES, Engine, engine
from bench.workers import (
    BENCH_DIR,
    LABELS,
    ROOT,
    SYSTEMS,
    describe_commands,
    kill_leftovers,
)

# Each phase, and the systems it applies to.
PLAN = (("drain", SYSTEMS), ("bulk", ("conveyor",)), ("latency", SYSTEMS))
QUICK = {"tasks": 500, "latency": 20, "idle_seconds": 2.0, "settle": 1.0}
FULL = {"tasks": 10_000, "latency": 200, "idle_seconds": 10.0, "settle": 2.0}
LOG_MARKERS = ("Traceback", "ERROR", "CRITICAL", "WARNING", "Error:", "Exception")
MAX_LOG_NOTES = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--db",
        default="sqlite,postgres",
        help="Comma-separated databases: sqlite, postgres, mysql (default: sqlite,postgres).",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="Comma-separated systems: conveyor, tasksdb (default: both).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A smoke run: 500 tasks, 20 latency samples, short idle window.",
    )
    parser.add_argument("--tasks", type=int, help="Tasks to enqueue and drain (10000).")
    parser.add_argument("--latency", type=int, help="Sequential latency samples (200).")
    parser.add_argument(
        "--latency-gap",
        type=float,
        default=0.0,
        help="Pause a random G to 2G seconds between latency samples, so that workers are "
        "idle when a task arrives (default: 0, no pause).",
    )
    parser.add_argument("--idle-seconds", type=float, help="Idle CPU window (10).")
    parser.add_argument(
        "--settle", type=float, help="Pause before latency samples and before the idle window (2)."
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="Worker processes for each system (default: 2)."
    )
    parser.add_argument(
        "--conn-max-age",
        default="none",
        help="CONN_MAX_AGE for both systems: seconds or 'none' (default).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="Longest any one wait may take, in seconds (default: 600).",
    )
    parser.add_argument(
        "--conveyor-ref",
        metavar="REF",
        help="Run Conveyor's src/ as of this git commit (extracted with git archive to a "
        "temporary directory) instead of the working tree, which may change during a run.",
    )
    parser.add_argument("--markdown", type=Path, help="Also write the results here.")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="Rewrite --markdown with this run alone; by default a run's section is added to "
        "the end of an existing file, which keeps the other benchmarks' records.",
    )
    # Adding is the default now; the flag stays so that recorded command lines still run.
    parser.add_argument("--append", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dbs = _choices(parser, "--db", args.db, ENGINES)
    args.system_list = _choices(parser, "--systems", args.systems, SYSTEMS)
    return args


def _choices(
    parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]
) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        parser.error(f"{flag}: choose from {', '.join(allowed)}")
    return chosen


# --- running one phase ------------------------------------------------------------------------


class Run:
    """One invocation: where its logs go, and the clients it starts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = BENCH_DIR / "out" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pidfile = self.dir / "worker-pids.txt"
        self.source, self.source_label = conveyor_source(args.conveyor_ref)

    def close(self) -> None:
        """Remove the extracted source tree, if any (kept outside the repository)."""
        if self.source != ROOT / "src":
            shutil.rmtree(self.source.parent, ignore_errors=True)

    def client_argv(self, phase: str, system: str, out: Path) -> list[str]:
        a = self.args
        return [
            sys.executable,
            "-m",
            "bench.client",
            phase,
            "--system",
            system,
            "--tasks",
            str(a.tasks),
            "--latency",
            str(a.latency),
            "--latency-gap",
            str(a.latency_gap),
            "--processes",
            str(a.processes),
            "--idle-seconds",
            str(a.idle_seconds),
            "--settle",
            str(a.settle),
            "--timeout",
            str(a.timeout),
            "--out",
            str(out),
            "--logdir",
            str(self.dir / "logs" / out.stem),
            "--pidfile",
            str(self.pidfile),
        ]

    def phase(self, db: str, phase: str, system: str, env: dict[str, str]) -> dict[str, Any]:
        """Run one client to completion (bounded); return its figures or its error."""
        name = f"{db}-{phase}-{system}"
        out = self.dir / f"{name}.json"
        log = self.dir / f"{name}.client.log"
        started = time.monotonic()
        say(f"[{ENGINE_LABELS[db]}] {phase}: {LABELS[system]} ...")
        try:
            code = run_bounded(
                self.client_argv(phase, system, out), env, log, timeout=3 * self.args.timeout + 120
            )
        finally:
            kill_leftovers(self.pidfile)
        outcome = "timed out" if code is None else f"exit code {code}"
        say(f"    done in {time.monotonic() - started:.1f}s ({outcome})")
        if code != 0 or not out.exists():
            return {
                "errors": [f"the {phase} phase failed ({outcome}); see {log.relative_to(ROOT)}"]
            }
        figures: dict[str, Any] = json.loads(out.read_text())
        figures["log_notes"] = _log_notes(figures.get("worker_logs", []))
        module = Path(figures.pop("conveyor_module", "")).resolve()
        if not module.is_relative_to(self.source.resolve()):
            figures["errors"] = [f"Conveyor was imported from {module}, not {self.source}"]
        return figures

    def database(self, db: str) -> dict[str, dict[str, Any]]:
        """Every phase of every chosen system on ``db``."""
        eng = engine(db, self.args.conn_max_age, self.source)
        results: dict[str, dict[str, Any]] = {s: {} for s in self.args.system_list}
        try:
            eng.prepare()
            for phase, systems in PLAN:
                for system in [s for s in systems if s in self.args.system_list]:
                    with eng.fresh() as env:
                        _merge(results[system], self.phase(db, phase, system, env))
        finally:
            eng.close()
        return results


def run_bounded(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Run ``argv`` with output to ``log``; its exit code, or None if it overran (stopped)."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            return None
        except BaseException:
            _stop(process)
            raise


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the client then stops its workers), SIGKILL if that takes too long."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _merge(into: dict[str, Any], figures: dict[str, Any]) -> None:
    for key in ("errors", "log_notes", "worker_logs"):
        into.setdefault(key, []).extend(figures.pop(key, []))
    into.update(figures)


def _log_notes(paths: list[str]) -> list[str]:
    """Lines of worker logs that look like warnings or errors (the first few)."""
    found: list[str] = []
    for path in [Path(p) for p in paths if Path(p).exists()]:
        for line in path.read_text(errors="replace").splitlines():
            if any(marker in line for marker in LOG_MARKERS):
                found.append(f"{path.name}: {line.strip()}")
    return found[:MAX_LOG_NOTES] + (
        [f"... and {len(found) - MAX_LOG_NOTES} more"] if len(found) > MAX_LOG_NOTES else []
    )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- facts and text ---------------------------------------------------------------------------


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def conveyor_source(ref: str | None) -> tuple[Path, str]:
    """Where Conveyor is imported from, and how to describe it."""
    if not ref:
        return ROOT / "src", working_tree_label()
    commit = _git("rev-parse", "--verify", "--short", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"--conveyor-ref {ref!r} is not a commit of this repository")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "src"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    target = Path(tempfile.mkdtemp(prefix=f"conveyor-{commit}-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "src", f"commit {commit} ({ref}, extracted with git archive)"


def working_tree_label() -> str:
    return f"working tree at commit {revision()}"


def revision() -> str:
    """The commit checked out, and whether ``src/`` differs from it."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "src")
    return f"{commit}{' with uncommitted changes in src/' if dirty else ''}"


def source_fingerprint(source: Path) -> str:
    """A hash of every file under ``source``: the code the workers import."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def source_after(run: Run) -> str:
    """How to describe the source at the end of the run (the working tree may have moved)."""
    return run.source_label if run.args.conveyor_ref else working_tree_label()


def source_facts(before: tuple[str, str], after: tuple[str, str]) -> list[tuple[str, str]]:
    """What Conveyor code ran: one version, or a warning that ``src/`` changed mid-run."""
    if before == after:
        return [("Conveyor source", f"{before[0]}; src/ sha256 {before[1]}, unchanged")]
    return [
        (
            "Conveyor source",
            f"CHANGED DURING THE RUN, figures may mix versions: {before[0]} (src/ sha256 "
            f"{before[1]}) at the start, {after[0]} (src/ sha256 {after[1]}) at the end",
        )
    ]


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts(
    args: argparse.Namespace,
    versions: dict[str, str],
    load_before: str,
    sources: list[tuple[str, str]],
) -> list[tuple[str, str]]:
    import psutil

    facts = [
        ("CPU", f"{os.cpu_count()} logical CPUs, {cpu_model()}"),
        ("Memory", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("Django", package_version("django")),
        ("django-conveyor", package_version("django-conveyor")),
        *sources,
        ("django-tasks-db", package_version("django-tasks-db")),
        ("psycopg", package_version("psycopg")),
    ]
    facts += [(ENGINE_LABELS[db], version) for db, version in versions.items()]
    facts += [
        (
            "CONN_MAX_AGE",
            "None (persistent)" if args.conn_max_age.lower() == "none" else args.conn_max_age,
        ),
        (
            "Workers",
            "; ".join(
                f"{LABELS[s]}: drain `{describe_commands(s, args.processes, True)}`"
                for s in args.system_list
            ),
        ),
        ("Load average (1/5/15 min) before / after", f"{load_before}; {load_average()}"),
    ]
    return facts


def command_line(argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", "-m", "bench", *argv])


INTRO = """\
# Benchmark: Conveyor vs django-tasks-db

Conveyor's `DatabaseBackend` and django-tasks-db's `DatabaseBackend`, measured in the same
run on each database, every phase on a fresh migrated database, with real worker processes.
The task is a no-op taking one integer. Both systems get the same settings: `CONN_MAX_AGE`
as below (persistent connections, django-tasks-db's best case), `DEBUG = False`, and on
SQLite `OPTIONS = {{"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA
synchronous=NORMAL"}}`. Each backend otherwise runs with its own defaults.

1. **Enqueue rate**: `task.enqueue(i)` {tasks:,} times in a loop (each call its own
   transaction); for Conveyor also one `conveyor.bulk_enqueue(task, [(i,), ...])` call with
   {tasks:,} calls (django-tasks-db has no bulk API).
2. **Drain**: the {tasks:,} tasks enqueued one by one are run by {processes} worker processes:
   `manage.py conveyor worker --backend conveyor --processes {processes} --until-done`, and
   {processes} x `manage.py db_worker --backend tasksdb` (its defaults: 1 s idle interval, a
   random start-up delay of up to 1 s), stopped with SIGTERM once every task is finished.
   Reported: the time from starting the workers until the table shows no task ready or
   running (polled every 25 ms), the throughput over that time, and the throughput between
   the first `started_at` and the last `finished_at` in the rows (which leaves process
   start-up out).
3. **Latency**: with the workers already running and idle (after 2 warm-up tasks), {latency}
   tasks one after another: enqueue one, poll its row every 1 ms until it is finished, then
   the next{gap}. p50/p99 of the stored pickup `started_at - enqueued_at` (both systems
   set `started_at` when a worker takes the task), of the stored `finished_at - enqueued_at`
   and of the client's wall time from before `enqueue()` to the poll that saw the task
   finished. With no pause, a
   worker that just finished a task looks for the next one at once, so django-tasks-db's
   figures depend on how its two workers' 1 s sleep timers fall against the client's rhythm,
   which changes from run to run; `--latency-gap G` (a random pause of G to 2G s between
   samples) measures workers that are truly idle when a task arrives.
4. **Idle cost**: after the latency run and a {settle:g} s pause, the CPU time (user + system,
   psutil) of every worker-side process over {idle:g} s, in % of one core; then memory of each
   process from psutil `memory_full_info()`: RSS and USS per worker process, the Conveyor
   supervisor apart, and USS/PSS summed over all of them (Conveyor's workers are forked from
   its supervisor and share pages with it, so its per-process USS is small; the PSS total is
   the fairest whole-footprint comparison).

"Better" says which direction is better; ratios are Conveyor / django-tasks-db. Single
run, no repetitions: expect a few percent of noise, more on a busy machine (see the load
average). To reproduce, from the repository root:

    {command}
"""


def intro(args: argparse.Namespace, command: str) -> str:
    return INTRO.format(
        tasks=args.tasks,
        processes=args.processes,
        latency=args.latency,
        gap=f" after a random pause of {args.latency_gap:g} to {2 * args.latency_gap:g} s"
        if args.latency_gap
        else " at once",
        settle=args.settle,
        idle=args.idle_seconds,
        command=command,
    )


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_before = load_average()
    run = Run(args)
    source_before = (run.source_label, source_fingerprint(run.source))
    started = time.monotonic()
    results: report.Results = {}
    versions: dict[str, str] = {}
    try:
        for db in args.dbs:
            versions[db] = _engine_version(db, args)
            results[db] = run.database(db)
        sources = source_facts(source_before, (source_after(run), source_fingerprint(run.source)))
    finally:
        kill_leftovers(run.pidfile)
        run.close()
    say(f"Finished in {time.monotonic() - started:.0f}s; logs in {run.dir.relative_to(ROOT)}")
    say(sources[0][1])
    (run.dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(report.render_text(results, args.tasks))
    if args.markdown:
        command = command_line(argv)
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        facts = machine_facts(args, versions, load_before, sources)
        (run.dir / "facts.json").write_text(json.dumps(dict(facts), indent=2))
        section = report.render_markdown(results, args.tasks, command, date, facts)
        write_markdown(args, section, intro(args, command))
    failed = any(f.get("errors") for per in results.values() for f in per.values())
    return 1 if failed else 0


def write_markdown(args: argparse.Namespace, section: str, intro_text: str) -> None:
    """Add the section to the end of ``--markdown``; write the intro first for a new file."""
    path: Path = args.markdown
    if path.exists() and not args.replace:
        with path.open("a") as f:
            f.write("\n" + section)
        say(f"Added this run to {path}")
    else:
        path.write_text(intro_text.rstrip() + "\n\n" + section)
        say(f"Wrote {path}")


def _engine_version(db: str, args: argparse.Namespace) -> str:
    eng: Engine = engine(db, args.conn_max_age, ROOT / "src")
    try:
        return eng.version()
    finally:
        eng.close()


if __name__ == "__main__":
    sys.exit(main())
