"""``python -m bench roundtrips``: what one statement costs on this machine, busy and idle.

Run from the repository root::

    .venv/bin/python -m bench roundtrips --markdown bench/RESULTS.md

Enqueue-to-result latency is a chain of round trips (enqueue, claim, save, the client's
poll), each begun by a process that was asleep. This times the bare steps, with no
Conveyor code: on PostgreSQL (psycopg, autocommit) a ``SELECT 1`` and a one-row INSERT
(a committed, flushed transaction; once more with ``synchronous_commit = off``), on SQLite
(a file in WAL mode, ``synchronous = NORMAL``) the same two, and on Redis a GET and an
LPUSH. Each is run back to back ("busy") and after a pause of ``--gap`` seconds in which
the process sleeps ("idle"); medians of ``--samples`` runs.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.run import say
from bench.sidebyside import append_markdown, md_table

MS = 1000.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench roundtrips", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--samples", type=int, default=100, help="Runs of each step (100).")
    parser.add_argument("--gap", type=float, default=0.05, help="Idle pause, s (0.05).")
    parser.add_argument("--markdown", type=Path, help="Add the results to the end of this file.")
    return parser.parse_args(argv)


def timed(step: Callable[[], Any], samples: int, gap: float) -> float:
    """The median seconds of ``step``, each run after sleeping ``gap`` s (0: none)."""
    step()
    found = []
    for _ in range(samples):
        if gap:
            time.sleep(gap)
        began = time.perf_counter()
        step()
        found.append(time.perf_counter() - began)
    return statistics.median(found)


PG_DATABASE = "conveyor_roundtrip"  # made for the run, dropped after it


def postgres_connect(dbname: str, **options: Any) -> Any:
    import psycopg

    return psycopg.connect(
        host=os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
        port=int(os.environ.get("BENCH_PG_PORT", "5432")),
        user=os.environ.get("BENCH_PG_USER", "postgres"),
        password=os.environ.get("BENCH_PG_PASSWORD", "") or None,
        dbname=dbname,
        autocommit=True,
        **options,
    )


@contextmanager
def postgres_steps() -> Iterator[dict[str, Callable[[], Any]]]:
    admin = postgres_connect("postgres")
    admin.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE}")
    admin.execute(f"CREATE DATABASE {PG_DATABASE}")
    conn = postgres_connect(PG_DATABASE)
    lazy = postgres_connect(PG_DATABASE, options="-c synchronous_commit=off")
    try:
        conn.execute("CREATE TABLE roundtrip (id bigserial PRIMARY KEY, v text)")
        yield {
            "PostgreSQL `SELECT 1`": lambda: conn.execute("SELECT 1").fetchall(),
            "PostgreSQL one-row INSERT, committed": lambda: conn.execute(
                "INSERT INTO roundtrip (v) VALUES ('x')"
            ),
            "PostgreSQL one-row INSERT, `synchronous_commit = off`": lambda: lazy.execute(
                "INSERT INTO roundtrip (v) VALUES ('x')"
            ),
        }
    finally:
        conn.close()
        lazy.close()
        admin.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE}")
        admin.close()


def sqlite_steps(directory: str) -> dict[str, Callable[[], Any]]:
    db = sqlite3.connect(str(Path(directory) / "roundtrip.sqlite3"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE roundtrip (id INTEGER PRIMARY KEY, v TEXT)")
    return {
        "SQLite `SELECT 1`": lambda: db.execute("SELECT 1").fetchall(),
        "SQLite one-row INSERT, committed": lambda: db.execute(
            "INSERT INTO roundtrip (v) VALUES ('x')"
        ),
    }


def redis_steps() -> dict[str, Callable[[], Any]]:
    import redis

    client = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    key = f"bench-roundtrip-{os.getpid()}"
    return {
        "Redis GET": lambda: client.get(key),
        "Redis LPUSH": lambda: client.lpush(key, b"x"),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as directory, postgres_steps() as postgres:
        steps = {**postgres, **sqlite_steps(directory), **redis_steps()}
        for name, step in steps.items():
            busy = timed(step, args.samples, 0.0)
            idle = timed(step, args.samples, args.gap)
            rows.append([name, f"{busy * MS:.3f}", f"{idle * MS:.3f}", f"{idle / busy:.1f}x"])
            say(f"{name}: busy {busy * MS:.3f} ms, idle {idle * MS:.3f} ms")
    header = ["Step", "Busy p50 (ms)", f"After {args.gap:g} s idle, p50 (ms)", "Idle / busy"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "`.venv/bin/python -m bench roundtrips" + (
        f" --markdown {args.markdown}`" if args.markdown else "`"
    )
    text = "\n".join(
        [
            f"## Round trips, {when}",
            "",
            " ".join(__doc__.split("\n\n")[1].split()),
            "",
            f"Command: {command}; {args.samples} samples of each.",
            "",
            *md_table(header, rows),
            "",
        ]
    )
    print(text)
    append_markdown(args.markdown, text)
    return 0
