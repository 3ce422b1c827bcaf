"""What ``python -m bench killstorm`` and ``python -m bench latency`` share.

Each run starts one client subprocess per measurement (``python -m bench.<client>``) on a
fresh database, reads the JSON it writes, and renders Markdown with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.databases import ENGINES, engine
from bench.run import (
    conveyor_source,
    cpu_model,
    load_average,
    package_version,
    run_bounded,
    say,
    source_fingerprint,
    working_tree_label,
)
from bench.workers import BENCH_DIR, ROOT, kill_leftovers

Figures = dict[str, Any]
COMMANDS = {  # python -m bench NAME
    "killstorm": "bench.killstorm",
    "latency": "bench.e2e",
    "timeouts": "bench.timeouts",
}
MAX_LISTED = 5  # ids and log lines listed under a table, per kind


def run_command(name: str, argv: list[str]) -> int:
    """Run ``python -m bench NAME`` for a name in ``COMMANDS``."""
    import importlib

    main: Any = importlib.import_module(COMMANDS[name]).main
    return int(main(argv))


def add_common_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument("--db", default="sqlite,postgres", help="sqlite, postgres (both).")
    parser.add_argument(
        "--timeout", type=float, default=timeout, help=f"Longest wait in one step, s ({timeout:g})."
    )
    parser.add_argument("--conveyor-ref", metavar="REF", help="Run Conveyor as of this commit.")
    parser.add_argument("--markdown", type=Path, help="Add the results to the end of this file.")


def database_list(parser: argparse.ArgumentParser, text: str) -> list[str]:
    dbs = [db.strip() for db in text.split(",") if db.strip()]
    if not dbs or any(db not in ENGINES for db in dbs):
        parser.error(f"--db: choose from {', '.join(ENGINES)}")
    return dbs


@dataclass
class Invocation:
    """One run: its log directory, the Conveyor source it imports, the load before it."""

    name: str
    ref: str | None

    def __post_init__(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.dir = BENCH_DIR / "out" / f"{self.name}-{stamp}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pidfile = self.dir / "worker-pids.txt"
        self.source, self.label = conveyor_source(self.ref)
        self.fingerprint = source_fingerprint(self.source)
        self.load_before = load_average()

    def client(self, name: str, argv: list[str], env: dict[str, str], timeout: float) -> Figures:
        """Run ``python -m <argv>`` to completion; its figures, or an error."""
        out, log = self.dir / f"{name}.json", self.dir / f"{name}.client.log"
        say(f"{name} ...")
        argv = [sys.executable, "-m", *argv, "--out", str(out), "--pidfile", str(self.pidfile)]
        try:
            code = run_bounded(argv, env, log, timeout=timeout)
        finally:
            kill_leftovers(self.pidfile)
        if code != 0 or not out.exists():
            how = "timed out" if code is None else f"exit code {code}"
            return {"errors": [f"{name} failed ({how}); see {log.relative_to(ROOT)}"]}
        figures: Figures = json.loads(out.read_text())
        return figures

    def source_text(self) -> str:
        """Which Conveyor ran, and whether ``src/`` moved during the run."""
        after = source_fingerprint(self.source)
        text = f"{self.label}; src/ sha256 {self.fingerprint}"
        if after != self.fingerprint:
            now = self.label if self.ref else working_tree_label()
            return f"CHANGED DURING THE RUN: {text} at the start, {now} ({after}) at the end"
        return text + ", unchanged"

    def close(self, results: Any) -> None:
        (self.dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if self.source != ROOT / "src":
            shutil.rmtree(self.source.parent, ignore_errors=True)


def machine_facts(run: Invocation, extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    import psutil

    return [
        ("CPU", f"{os.cpu_count()} logical CPUs, {cpu_model()}"),
        ("Memory", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("Django", package_version("django")),
        ("Conveyor source", run.source_text()),
        *extra,
        ("Load average (1/5/15 min) before / after", f"{run.load_before}; {load_average()}"),
    ]


def measure_modes(
    run: Invocation, db: str, database: str, argvs: dict[str, list[str]], timeout: float
) -> Figures:
    """Run each mode's client (``argvs``) on its own fresh copy of ``database`` on ``db``."""
    eng = engine(db, "none", run.source, database=database)
    found: Figures = {"version": eng.version()}
    try:
        eng.prepare()
        for mode, argv in argvs.items():
            with eng.fresh() as env:
                found[mode] = run.client(f"{db}-{mode}", argv, env, timeout)
    finally:
        eng.close()
    return found


def run_per_database(
    run: Invocation,
    args: argparse.Namespace,
    measure: Callable[[Invocation, argparse.Namespace, str], Figures],
    render: Callable[[Invocation, argparse.Namespace, dict[str, Figures]], str],
) -> int:
    """Measure each of ``args.dbs``, print the report and add it to ``--markdown``.

    Exit code 1 if a client failed.
    """
    results: dict[str, Figures] = {}
    try:
        for db in args.dbs:
            results[db] = measure(run, args, db)
        text = render(run, args, results)
    finally:
        run.close(results)
    print(text)
    append_markdown(args.markdown, text)
    say(f"Logs in {run.dir.relative_to(ROOT)}")
    failed = [f for found in results.values() for f in found.values() if _failed(f)]
    return 1 if failed else 0


def _failed(figures: Any) -> bool:
    return isinstance(figures, dict) and bool(figures.get("errors"))


def num(value: Any, digits: int = 2) -> str:
    """A figure as the tables show it; ``n/a`` for none."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def findings(found: Figures, modes: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Each mode's errors, then the first few items of each list in ``keys``."""
    lines = []
    for mode in modes:
        figures = found[mode]
        lines += [f"- {mode}: {error}" for error in figures.get("errors", [])]
        for key in keys:
            shown = figures.get(key, [])[:MAX_LISTED]
            lines += [f"- {mode}, {key.replace('_', ' ')}: `{item}`" for item in shown]
    return lines


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---", *("---:" for _ in header[1:])]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|"]
    return lines + [f"| {' | '.join(row)} |" for row in rows]


def facts_table(facts: Sequence[tuple[str, str]]) -> list[str]:
    return ["| Machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts)]


def append_markdown(path: Path | None, section: str) -> None:
    if path is None:
        return
    with path.open("a") as f:
        f.write("\n" + section.rstrip() + "\n")
    say(f"Added this run to {path}")
