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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.databases import ENGINES
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
COMMANDS = {"killstorm": "bench.killstorm", "latency": "bench.e2e"}  # python -m bench NAME


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
