"""``python -m bench latency``: enqueue-to-result time, Conveyor beside Huey on Redis.

Run from the repository root::

    .venv/bin/python -m bench latency --quick                       # a smoke run
    .venv/bin/python -m bench latency --db sqlite,postgres --markdown bench/RESULTS.md

Conveyor on each database (a fresh migrated one), then Huey on Redis once for each
``--huey-worker-type``; 2 idle worker processes each. See ``bench/e2e_client.py`` for one
sample. Ratios are Conveyor / Huey with the first worker type. Logs go to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench import sidebyside as sbs
from bench.databases import ENGINE_LABELS, base_env, engine
from bench.run import package_version, say
from bench.workers import ROOT, describe_commands

DATABASE = "conveyor_e2e"  # on PostgreSQL, apart from the other runs' databases
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MS = 1000.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench latency", description=__doc__.split("\n\n")[0]
    )
    sbs.add_common_arguments(parser, timeout=600.0)
    parser.add_argument("--samples", type=int, default=200, help="Samples per system (200).")
    parser.add_argument("--gap", default="0.05,0.1", help="Pause between samples, s (0.05,0.1).")
    parser.add_argument("--processes", type=int, default=2, help="Worker processes (2).")
    parser.add_argument(
        "--huey-worker-type", default="process,thread", help="Huey -k values (process,thread)."
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run: 30 samples.")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples = 30
    args.dbs = sbs.database_list(parser, args.db)
    args.gap_min, args.gap_max = (float(x) for x in args.gap.split(","))
    args.huey_types = [t.strip() for t in args.huey_worker_type.split(",") if t.strip()]
    return args


def client_argv(args: argparse.Namespace, system: str, *extra: str) -> list[str]:
    return [
        "bench.e2e_client",
        system,
        f"--samples={args.samples}",
        f"--gap-min={args.gap_min}",
        f"--gap-max={args.gap_max}",
        f"--processes={args.processes}",
        *extra,
    ]


def measure_conveyor(run: sbs.Invocation, args: argparse.Namespace, db: str) -> dict[str, Any]:
    eng = engine(db, "none", run.source, database=DATABASE)
    try:
        version = eng.version()
        eng.prepare()
        with eng.fresh() as env:
            found = run.client(f"conveyor-{db}", client_argv(args, "conveyor"), env, args.timeout)
    finally:
        eng.close()
    return {**found, "version": version}


def measure_huey(run: sbs.Invocation, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    env = {**base_env("none", run.source), "BENCH_REDIS_URL": REDIS_URL}
    argv = client_argv(args, "huey", f"--huey-worker-type={kind}")
    return run.client(f"huey-{kind}", argv, env, args.timeout)


def redis_version() -> str:
    import redis

    info = redis.Redis.from_url(REDIS_URL).info("server")
    return str(info.get("redis_version", "unknown"))


# --- the report ---------------------------------------------------------------------------

ROWS = (
    ("Enqueue to result, client wall time p50 (ms)", "wall", "p50"),
    ("Enqueue to result, client wall time p99 (ms)", "wall", "p99"),
    ("`enqueue()` call p50 (ms)", "enqueue", "p50"),
    ("Pickup: task start - client time before enqueue, p50 (ms)", "pickup", "p50"),
    ("Pickup: task start - client time before enqueue, p99 (ms)", "pickup", "p99"),
    ("Pickup: stored `started_at - enqueued_at`, p50 (ms)", "stored_pickup", "p50"),
    ("Pickup: stored `started_at - enqueued_at`, p99 (ms)", "stored_pickup", "p99"),
    ("Task returned -> client saw the result, p50 (ms)", "seen_after_return", "p50"),
    ("Task returned -> client saw the result, p99 (ms)", "seen_after_return", "p99"),
    ("One result poll (the last), p50 (ms)", "poll", "p50"),
    ("Polls per sample, p50", "polls", "p50"),
)


def _value(figures: dict[str, Any], key: str, stat: str) -> float | None:
    value = figures.get(key, {}).get(stat)
    return None if value is None else value * (1 if key == "polls" else MS)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(results: dict[str, dict[str, Any]], columns: list[str], ref: str) -> list[str]:
    conveyors = [c for c in columns if c.startswith("Conveyor")]
    header = ["Metric", *columns, *(f"{c} / {ref}" for c in conveyors)]
    rows = []
    for label, key, stat in ROWS:
        values = {c: _value(results[c], key, stat) for c in columns}
        ratios = [sbs.ratio(values[c], values.get(ref)) for c in conveyors]
        rows.append([label, *(_cell(values[c]) for c in columns), *ratios])
    rows.append(
        ["Samples (failed)", *(_count(results[c]) for c in columns), *("" for _ in conveyors)]
    )
    return sbs.md_table(header, rows)


def _count(figures: dict[str, Any]) -> str:
    if "samples" not in figures:
        return "; ".join(figures.get("errors", ["none"]))
    return f"{figures['samples']} ({figures['failed']})"


METHOD = """\
With 2 idle worker processes, {samples} samples one after another: note the time, enqueue
one no-op task, poll its result every 1 ms until it is finished (Conveyor:
`result.refresh()`; Huey: `huey.result(id, preserve=True)`), then pause a random
{gap_min:g}-{gap_max:g} s so that the workers are idle again (after 2 warm-up samples and
1 s). Wall time: before `enqueue()` to the poll that saw the result. Pickup: when the task
started (Conveyor: the stored `started_at`; Huey keeps none, so its task returns
`time.time()`) minus the client's clock before `enqueue()`. Conveyor on a fresh migrated
database each, `CONN_MAX_AGE=None`; Huey's `RedisHuey` with its defaults (blocking BRPOP)."""


def render(run: sbs.Invocation, args: argparse.Namespace, results: dict[str, Any]) -> str:
    command = " ".join([".venv/bin/python -m bench latency", *args.argv])
    extra = [
        (label.removeprefix("Conveyor "), found["version"])
        for label, found in results.items()
        if "version" in found
    ]
    extra += [("Huey", package_version("huey")), ("redis-py", package_version("redis"))]
    extra += [("Redis server", redis_version())]
    conveyor = describe_commands("conveyor", args.processes, False)
    huey = f"huey_consumer bench.huey_app.huey -w {args.processes} -k {{{args.huey_worker_type}}}"
    extra += [("Workers", f"Conveyor: `{conveyor}`; Huey: `{huey}`")]
    columns = list(results)
    ref = next((c for c in columns if c.startswith("Huey")), columns[0])
    method = METHOD.format(samples=args.samples, gap_min=args.gap_min, gap_max=args.gap_max)
    out = [f"## Enqueue to result, {run.dir.name}", "", method, "", f"Command: `{command}`", ""]
    out += sbs.facts_table(sbs.machine_facts(run, extra))
    out += ["", *table(results, columns, ref)]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.argv = argv
    run = sbs.Invocation("latency", args.conveyor_ref)
    results: dict[str, Any] = {}
    try:
        for db in args.dbs:
            results[f"Conveyor {ENGINE_LABELS[db]}"] = measure_conveyor(run, args, db)
        for kind in args.huey_types:
            results[f"Huey Redis ({kind})"] = measure_huey(run, args, kind)
        text = render(run, args, results)
    finally:
        run.close(results)
    print(text)
    sbs.append_markdown(args.markdown, text)
    say(f"Logs in {run.dir.relative_to(ROOT)}")
    return 1 if any(found.get("errors") for found in results.values()) else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
