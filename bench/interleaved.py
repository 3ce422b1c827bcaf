"""``python -m bench interleaved A B``: enqueue-to-result of two systems, sample by sample.

``python -m bench latency`` measures one system after another, a minute or more apart; on
a machine whose speed drifts by more than the difference sought, two such runs disagree.
Here both systems run side by side, each with its own idle workers (and, for Conveyor, its
own SQLite database), and their samples alternate (A then B, then B then A), so that both
meet the same moments of the machine. A and B: a commit of this repository, ``worktree``
(the working tree's ``src/``), or ``huey`` (Huey on Redis, as in ``latency``).

Each sample is ``latency``'s: enqueue one no-op, poll its result every 1 ms until it is
there (``result.refresh()``; Huey: ``huey.result(id, preserve=True)``), after a random pause
of 0.05-0.1 s; each system has a client process of its own, which the driver tells when to
take its sample.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bench import sidebyside as sbs
from bench.databases import base_env, engine
from bench.e2e import REDIS_URL
from bench.run import conveyor_source, say
from bench.workers import ROOT, WorkerGroup, worker_commands

WARMUP = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench interleaved")
    parser.add_argument("systems", nargs=2, metavar="SYSTEM", help="A commit, worktree, huey.")
    parser.add_argument("--samples", type=int, default=200, help="Samples per system (200).")
    parser.add_argument("--processes", type=int, default=2, help="Worker processes (2).")
    parser.add_argument("--markdown", type=Path, help="Add the results to the end of this file.")
    return parser.parse_args(argv)


class Side:
    """One system: its workers, and a client process that takes a sample when told."""

    def __init__(self, system: str, args: argparse.Namespace, run_dir: Path) -> None:
        self.system = system
        self.samples: list[dict[str, float]] = []
        self.logs = run_dir / f"{len(list(run_dir.iterdir()))}-{system}"
        self.engine: Any = None
        if system == "huey":
            self.label = "Huey on Redis"
            self.env = {**base_env("none", ROOT / "src"), "BENCH_REDIS_URL": REDIS_URL}
            consumer = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.huey_app.huey"]
            self.workers = [[*consumer, "-w", str(args.processes), "-k", "process"]]
        else:
            ref = None if system == "worktree" else system
            source, self.label = conveyor_source(ref)
            self.engine = engine("sqlite", "none", source)
            self.engine.prepare()
            self.fresh = self.engine.fresh()
            self.env = self.fresh.__enter__()
            self.workers = worker_commands("conveyor", args.processes, until_done=False)
        label = "huey" if system == "huey" else "conveyor"
        self.group = WorkerGroup(self.logs, label, supervised=True, pidfile=run_dir / "pids.txt")
        self.client: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.group.__enter__()
        self.group.start(self.workers, env=self.env)
        kind = "huey" if self.system == "huey" else "conveyor"
        self.client = subprocess.Popen(
            [sys.executable, "-m", "bench.interleaved_client", kind],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def sample(self, i: int) -> dict[str, float]:
        assert self.client is not None
        stdin: TextIO = self.client.stdin  # type: ignore[assignment]
        stdout: TextIO = self.client.stdout  # type: ignore[assignment]
        stdin.write(f"{i}\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.system} client ended; see its workers' logs")
        found: dict[str, float] = json.loads(line)
        return found

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.stdin.close()  # type: ignore[union-attr]
            self.client.wait(timeout=30)
        self.group.__exit__(None, None, None)
        if self.engine is not None:
            self.fresh.__exit__(None, None, None)
            self.engine.close()


@contextlib.contextmanager
def sides(args: argparse.Namespace, run_dir: Path) -> Iterator[list[Side]]:
    made: list[Side] = []
    try:
        for system in args.systems:
            made.append(Side(system, args, run_dir))
            made[-1].start()
        yield made
    finally:
        for side in made:
            side.close()


def measure(pair: list[Side], samples: int) -> None:
    for i in range(WARMUP):  # the workers are up and have run a task
        for side in pair:
            side.sample(-1 - i)
    time.sleep(1.0)
    for i in range(samples):
        for side in pair if i % 2 == 0 else pair[::-1]:
            # Random, so that samples never fall into step with a worker's timer.
            time.sleep(random.uniform(0.05, 0.1))
            side.samples.append(side.sample(i))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


ROWS = (  # label, key, statistic
    ("Enqueue to result, p25 (ms)", "wall", 0.25),
    ("Enqueue to result, p50 (ms)", "wall", 0.5),
    ("Enqueue to result, p75 (ms)", "wall", 0.75),
    ("Enqueue to result, mean (ms)", "wall", None),
    ("`enqueue()` call p50 (ms)", "enqueue", 0.5),
    ("Pickup: task start - client time before enqueue, p50 (ms)", "pickup", 0.5),
    ("One result poll (the last), p50 (ms)", "poll", 0.5),
)


def figure(samples: list[dict[str, float]], key: str, q: float | None) -> float:
    values = [s[key] * 1000 for s in samples]
    return statistics.mean(values) if q is None else quantile(values, q)


def render(pair: list[Side], args: argparse.Namespace, run: sbs.Invocation) -> str:
    a, b = pair
    header = ["Metric", f"A: {a.system}", f"B: {b.system}", "A / B"]
    rows = []
    for label, key, q in ROWS:
        x, y = figure(a.samples, key, q), figure(b.samples, key, q)
        rows.append([label, f"{x:.2f}", f"{y:.2f}", f"{x / y:.2f}x"])
    for side, name in ((a, "A"), (b, "B")):
        seen = sum(1 for s in side.samples if s["polls"] <= 2) / len(side.samples)
        rows.append([f"{name}: samples seen by the second poll or sooner", f"{seen:.0%}", "", ""])
    extra = [
        ("A", a.label),
        ("B", b.label),
        ("Workers", f"{args.processes} processes each; Conveyor on SQLite (a database each)"),
    ]
    # The driver's own source says nothing: each side names the Conveyor it ran.
    facts = [fact for fact in sbs.machine_facts(run, extra) if fact[0] != "Conveyor source"]
    command = " ".join(["python -m bench interleaved", *sys.argv[2:]])
    out = [
        f"## Enqueue to result, interleaved, {run.dir.name}",
        "",
        "Samples of the two systems alternate (A then B, then B then A), each after a random "
        f"0.05-0.1 s pause; {args.samples} samples each after {WARMUP} warm-up samples.",
        "",
        f"Command: `{command}`",
        "",
        *sbs.facts_table(facts),
        "",
        *sbs.md_table(header, rows),
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    run = sbs.Invocation("interleaved", None)
    with sides(args, run.dir) as pair:
        say("sampling ...")
        measure(pair, args.samples)
        text = render(pair, args, run)
    run.close({side.system: side.samples for side in pair})
    print(text)
    sbs.append_markdown(args.markdown, text)
    return 0
