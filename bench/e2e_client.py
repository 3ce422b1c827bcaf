"""The client of ``python -m bench latency``: enqueue-to-result times with idle workers.

``python -m bench.e2e_client SYSTEM --samples N --out FILE ...``. ``conveyor``: the
database comes from the environment (``bench/settings.py``) and the workers are
``manage.py conveyor worker --processes 2``. ``huey``: a ``huey_consumer`` of
``bench/huey_app.py`` on Redis. After 2 warm-up samples and a pause, N times: note the
time, enqueue one no-op task, poll its result every 1 ms until it is there, then pause a
random ``--gap-min`` to ``--gap-max`` seconds so that the workers are idle again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench.workers import WorkerGroup, worker_commands

POLL = 0.001  # seconds between polls of one result
WARMUP = 2
SAMPLE_TIMEOUT = 30.0
Sample = dict[str, float]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_client")
    parser.add_argument("system", choices=("conveyor", "huey"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--gap-min", type=float, default=0.05)
    parser.add_argument("--gap-max", type=float, default=0.1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--huey-worker-type", default="process")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pidfile", type=Path, default=None)
    return parser.parse_args(argv)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``values``."""
    if len(values) < 2:
        return {"p50": values[0], "p99": values[0], "max": values[0]} if values else {}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p99": cuts[98], "max": max(values)}


def poll(check: Callable[[], Any]) -> tuple[Any, int, float]:
    """Call ``check`` every ``POLL`` s until it returns something; that, polls, last poll's s."""
    deadline = time.perf_counter() + SAMPLE_TIMEOUT
    polls = 0
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        found = check()
        polls += 1
        if found is not None:
            return found, polls, time.perf_counter() - began
        time.sleep(POLL)
    raise TimeoutError(f"no result within {SAMPLE_TIMEOUT}s")


def conveyor_sample(i: int) -> Sample:
    from django.tasks import TaskResultStatus

    from bench.app.tasks import noop_conveyor

    wall0, t0 = time.time(), time.perf_counter()
    result = noop_conveyor.enqueue(i)
    enqueued = time.perf_counter()

    def finished() -> bool | None:
        result.refresh()
        return True if result.is_finished else None

    _, polls, last_poll = poll(finished)
    wall = time.perf_counter() - t0
    assert result.started_at
    assert result.finished_at
    assert result.enqueued_at
    return {
        "wall": wall,
        "enqueue": enqueued - t0,
        "pickup": result.started_at.timestamp() - wall0,
        "stored_pickup": (result.started_at - result.enqueued_at).total_seconds(),
        "seen_after_return": wall - (result.finished_at.timestamp() - wall0),
        "poll": last_poll,
        "polls": polls,
        "ok": float(result.status == TaskResultStatus.SUCCESSFUL),
    }


def huey_sample(i: int) -> Sample:
    from bench.huey_app import huey, noop

    wall0, t0 = time.time(), time.perf_counter()
    handle = noop(i)
    enqueued = time.perf_counter()
    started, polls, last_poll = poll(lambda: huey.result(handle.id, preserve=True))
    return {
        "wall": time.perf_counter() - t0,
        "enqueue": enqueued - t0,
        "pickup": started - wall0,
        "poll": last_poll,
        "polls": polls,
        "ok": 1.0,
    }


def start(system: str, args: argparse.Namespace, group: WorkerGroup) -> Callable[[int], Sample]:
    """Start the workers of ``system``; its sampling function."""
    if system == "conveyor":
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
        import django

        django.setup()
        group.start(worker_commands("conveyor", args.processes, until_done=False))
        return conveyor_sample
    from bench.huey_app import huey

    huey.flush()
    consumer = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.huey_app.huey"]
    group.start([[*consumer, "-w", str(args.processes), "-k", args.huey_worker_type]])
    return huey_sample


def measure(sample: Callable[[int], Sample], args: argparse.Namespace) -> list[Sample]:
    for i in range(WARMUP):  # the workers are up and have run a task
        sample(-1 - i)
    time.sleep(args.settle)
    samples = []
    for i in range(args.samples):
        samples.append(sample(i))
        # Random, so that samples never fall into step with a worker's timer.
        time.sleep(random.uniform(args.gap_min, args.gap_max))
    return samples


def summary(samples: list[Sample]) -> dict[str, Any]:
    figures: dict[str, Any] = {"samples": len(samples)}
    figures["failed"] = sum(1 for s in samples if not s["ok"])
    for key in samples[0] if samples else ():
        if key != "ok":
            values = [s[key] for s in samples]
            figures[key] = {**percentiles(values), "all": values}
    return figures


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through WorkerGroup.__exit__: workers stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    logdir = Path(f"{args.out.with_suffix('')}-logs")
    with WorkerGroup(logdir, args.system, supervised=True, pidfile=args.pidfile) as group:
        samples = measure(start(args.system, args, group), args)
    figures = summary(samples)
    figures["logs"] = [str(p) for p in group.logs]
    args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
