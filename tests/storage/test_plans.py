"""Plan tests: claims, staging, the next-due lookup, retention and monitor reads stay flat.

Each engine gets 300,000 rows that a claim must not read: 100k ready jobs in another queue
(at a lower priority), 100k finished ones and 100k scheduled ones at a higher priority. The
exact SQL the transitions send is explained (PostgreSQL, SQLite, MariaDB), before and after
the planner has statistics, and the verbs are timed; then the public verbs are checked to
return the right jobs among all those rows.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import pytest
from django.db import transaction
from django.utils import timezone

from conveyor.backends.database import store as store_module
from conveyor.backends.database.models import Job
from conveyor.backends.database.transitions import dispatch, retention
from conveyor.options import TRIM_WINDOW
from conveyor.records import QueueSelector

ROWS = 100_000
LIMIT = 16
TABLE = store_module.TABLE
READY = {"conveyor_job_ready_idx", "conveyor_job_ready_queue_idx"}
SCHEDULED = {"conveyor_job_scheduled_idx"}
FINISHED = {"conveyor_job_finished_idx"}
EXPIRY = {"conveyor_job_expiry_idx"}
SUCCEEDED = {"conveyor_job_succeeded_idx"}
RUNNING = {"conveyor_job_running_idx"}
# On MySQL/MariaDB every one of these indexes leads with the state: a ``ref`` on any of them
# reads just the running rows.
STATE_LED = READY | SCHEDULED | FINISHED | EXPIRY | SUCCEEDED | RUNNING
KEEP_LAST = 10
PRIMARY_KEY = {"conveyor_job_pkey", "INTEGER PRIMARY KEY"}  # PostgreSQL, SQLite
SELECTORS = {
    "emails": QueueSelector(include=frozenset({"emails"})),
    "all": QueueSelector(),
    "emails+default": QueueSelector(include=frozenset({"emails", "default"})),
    # What a worker serving every queue sends once the backend's queues are known.
    "all, named": QueueSelector(include=frozenset({"default", "emails", "reports"})),
}
MAX_ROWS_READ = 200
MAX_BUFFERS = 200  # PostgreSQL pages a read touches; the whole table is some 6,000
# ... and a claim, which writes 16 rows and their entries in each of the table's 8 indexes.
MAX_CLAIM_BUFFERS = 1000
BUDGET = 0.050  # seconds, the median of 5 runs of one verb
STATS_BUDGET = 1.0

COLUMNS = (
    "uuid, backend_name, queue_name, task_path, priority, state, args, kwargs, errors, "
    "worker_ids, attempts, lost, enqueued_at, available_at, finished_at, delivery"
)
# Per engine: what precedes SELECT, what it selects FROM, and a unique uuid from ``n``.
SERIES = {
    "postgresql": ("", f"generate_series(1, {ROWS}) AS n", "md5((n + {offset})::text)::uuid"),
    "sqlite": (
        f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {ROWS}) ",
        "s",
        "printf('%%032x', n + {offset})",
    ),
    "mysql": (
        f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {ROWS}) ",
        "s",
        "lpad(hex(n + {offset}), 32, '0')",
    ),
}
# The scheduled jobs are spread over every queue, so that no claim can skip them by queue.
SPREAD = "CASE n %% 3 WHEN 0 THEN 'default' WHEN 1 THEN 'emails' ELSE 'reports' END"


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """What was stored: the clock used, and the ids of the few jobs claims should return."""

    now: datetime
    first: list[str]  # emails and default at priority 0, in claim order
    last: list[str]  # emails at priority -20, below every report, in claim order
    queues: dict[str, str]  # id -> queue, of the few


# --- filling -------------------------------------------------------------------------


def _insert_series(
    backend: Any, offset: int, queue: str, priority: int, state: str, **at: datetime
) -> None:
    """Insert ``ROWS`` jobs of one kind in one set-based statement."""
    store = backend.store
    prefix, source, uuid = SERIES[store.connection.vendor]
    finished = "%s" if "finished" in at else "NULL"
    sql = (
        f"INSERT INTO {TABLE} ({COLUMNS}) {prefix}"
        f"SELECT {uuid.format(offset=offset)}, %s, {queue}, 'tests.plans', %s, %s, "
        f"'[]', '{{}}', '[]', '[]', 0, 0, %s, %s, {finished}, '' FROM {source}"
    )
    times = [at["available"], at["available"], *([at["finished"]] if "finished" in at else [])]
    params = [backend.alias, priority, state, *(store.time(t) for t in times)]
    assert store.execute(sql, params) == ROWS


def _fill(backend: Any) -> Loaded:
    """Store the 300k rows claims must not read, and the few they must return."""
    store, now = backend.store, timezone.now()
    if store.connection.vendor == "mysql":  # its default stops recursion at 1,000 rows
        store.execute("SET SESSION max_recursive_iterations = %s", [ROWS])
    day = timedelta(days=1)
    _insert_series(backend, 0, "'reports'", -10, "ready", available=now - timedelta(hours=1))
    _insert_series(backend, ROWS, "'reports'", 0, "succeeded", available=now - day, finished=now)
    _insert_series(backend, 2 * ROWS, SPREAD, 50, "scheduled", available=now + day)
    if store.connection.vendor == "mysql":
        store.execute("SET SESSION max_recursive_iterations = DEFAULT")

    def job(queue: str, priority: int, minutes_ago: float) -> Job:
        at = now - timedelta(minutes=minutes_ago)
        return Job(
            backend_name=backend.alias,
            queue_name=queue,
            task_path="tests.plans",
            priority=priority,
            enqueued_at=at,
            available_at=at,
        )

    first = [job(("emails", "default")[i % 2], 0, 10 - i) for i in range(6)]
    last = [job("emails", -20, 5 - i) for i in range(2)]
    Job.objects.using(store.using).bulk_create([*reversed(first), *last])
    return Loaded(
        now=now,
        first=[str(j.uuid) for j in first],
        last=[str(j.uuid) for j in last],
        queues={str(j.uuid): j.queue_name for j in [*first, *last]},
    )


def _analyze(backend: Any) -> None:
    """Gather the planner's statistics, as autovacuum or a maintenance job would."""
    store = backend.store
    vendor = store.connection.vendor
    if vendor == "mysql":
        store.fetch(f"ANALYZE TABLE {TABLE}")
    else:
        store.execute(f"ANALYZE {TABLE}")


def _empty(backend: Any) -> None:
    """Remove the rows and SQLite's statistics (MariaDB: Django's flush DELETEs, slowly)."""
    store = backend.store
    if store.connection.vendor == "sqlite":
        store.execute(f"DELETE FROM {TABLE}")
        if store.fetch("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'"):
            store.execute("DELETE FROM sqlite_stat1")
            store.execute("ANALYZE sqlite_master")  # the planner forgets them
    else:
        store.execute(f"TRUNCATE TABLE {TABLE}")


@pytest.fixture
def loaded(backend: Any) -> Iterator[Loaded]:
    yield _fill(backend)
    _empty(backend)


# --- the SQL each verb sends -------------------------------------------------------------


def _sent(backend: Any, verb: Callable[[], Any]) -> list[tuple[str, list[Any]]]:
    """The statements (SQL and parameters, as given to the driver) that ``verb`` runs."""
    statements: list[tuple[str, list[Any]]] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append((sql, list(params or ())))
        return execute(sql, params, many, context)

    with backend.store.connection.execute_wrapper(record):
        verb()
    return statements


class Probe(NamedTuple):
    """A statement to explain, the indexes it may read, the pages it may touch."""

    sql: str
    params: list[Any]
    indexes: set[str]
    buffers: int = MAX_BUFFERS
    # It may read the whole of a partial index and sort what it read: one that holds just
    # the running rows, a few per worker thread.
    whole_index: bool = False


def _claim_statement(backend: Any, selector: QueueSelector) -> tuple[str, list[Any]]:
    """The statement that took the jobs, as a claim sent it; the jobs are given back."""
    taken: list[Any] = []

    def claim() -> None:
        taken.extend(backend.claim("plans-worker", selector, LIMIT))

    sent = _sent(backend, claim)
    assert taken and backend.unclaim(taken) == len(taken)
    # One statement (SQLite first reads whether there is anything to take), nothing per row.
    assert len(sent) <= 2, "\n".join(sql for sql, _ in sent)
    [statement] = [(sql, params) for sql, params in sent if sql.startswith(("UPDATE", "WITH"))]
    return statement


def _probes(backend: Any, loaded: Loaded, analyzed: bool) -> dict[str, Probe]:
    """Each statement to explain, with the indexes it may read."""
    store = backend.store
    picks = {
        f"claim pick ({name})": Probe(*dispatch._arms(store, selector, LIMIT), READY)
        for name, selector in SELECTORS.items()
    }
    claims = {
        f"claim ({name})": Probe(
            *_claim_statement(backend, selector), READY | PRIMARY_KEY, MAX_CLAIM_BUFFERS
        )
        for name, selector in SELECTORS.items()
        if store.dialect.update_returning  # elsewhere the pick above, then by primary key
    }
    [stage] = _sent(backend, backend.stage)  # nothing is due: the probe only
    [due] = _sent(backend, lambda: backend.next_due(QueueSelector()))
    [prune] = _sent(backend, lambda: backend.prune(loaded.now - timedelta(days=2)))
    [expire] = _sent(backend, backend.expire)  # no finished job has expired: the pick only
    return {
        **_monitor_probes(backend, loaded),
        **picks,
        **claims,
        "stage probe": Probe(*stage, SCHEDULED),
        "next due": Probe(*due, SCHEDULED),
        "prune pick": Probe(*prune, FINISHED),
        "expire pick": Probe(*expire, EXPIRY),
        **_trim_probes(backend, analyzed),
    }


def _monitor_probes(backend: Any, loaded: Loaded) -> dict[str, Probe]:
    """What a monitor reads: the running rows, and finished ones within a time and a LIMIT."""
    [running] = _sent(backend, lambda: backend.running(limit=LIMIT))
    # The 100,000 successes finished at ``now``: failures since a second later read none of
    # them (the time bound is an index condition), latency the newest LIMIT of them.
    later = loaded.now + timedelta(seconds=1)
    [failures] = _sent(backend, lambda: backend.recent_failures(later, limit=LIMIT))
    earlier = loaded.now - timedelta(minutes=1)
    [latency] = _sent(backend, lambda: backend.pickup_latency(earlier, limit=LIMIT))
    return {
        "running": Probe(*running, STATE_LED, whole_index=True),
        "recent failures": Probe(*failures, FINISHED),
        "pickup latency": Probe(*latency, STATE_LED, whole_index=True),
    }


def _trim_probes(backend: Any, analyzed: bool) -> dict[str, Probe]:
    # Without statistics PostgreSQL guesses one matching row whichever index it reads, and
    # the finished jobs' index (which holds every success too, in finish order) ties with
    # the succeeded jobs' own; it reads this one once the table has been analysed.
    if backend.store.connection.vendor == "postgresql" and not analyzed:
        return {}
    # It reads N + TRIM_WINDOW entries, each perhaps on its own table page: still some 110
    # rows of the 300,000, but more pages than a claim's few.
    return {"keep_last pick": Probe(*_trim_pick(backend), SUCCEEDED, 2 * MAX_BUFFERS)}


def _trim_pick(backend: Any) -> tuple[str, list[Any]]:
    """What a save of a ``keep_last`` task reads: its successes just past the newest N."""
    store = backend.store
    with transaction.atomic(using=store.using):  # the rows it lets go of are kept
        sent = _sent(backend, lambda: retention.trim(store, "tests.plans", KEEP_LAST, TRIM_WINDOW))
        transaction.set_rollback(True, using=store.using)
    [pick, _] = sent  # then an UPDATE of the few ids picked, by primary key
    return pick


# --- PostgreSQL --------------------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _index_of(node: dict[str, Any]) -> str | None:
    """The index a scan reads: its own, or that of the bitmap index scan under it."""
    if node["Node Type"] != "Bitmap Heap Scan":
        return node.get("Index Name")
    names = {n.get("Index Name") for n in _nodes(node) if n["Node Type"] == "Bitmap Index Scan"}
    return names.pop() if len(names) == 1 else None


def _check_postgresql(backend: Any, probe: Probe) -> str:
    store = backend.store
    with transaction.atomic(using=store.using):  # a claim is run, then undone
        [(raw,)] = store.fetch(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {probe.sql}", probe.params)
        transaction.set_rollback(True, using=store.using)
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    scans = [
        n for n in _nodes(plan) if "Scan" in n["Node Type"] and n.get("Relation Name") == TABLE
    ]
    read = sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in scans
    )
    buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    shown = ", ".join(f"{n['Node Type']} using {_index_of(n)}" for n in scans)
    summary = f"{shown}; {read} rows read, {buffers} buffers"
    assert scans, summary
    for node in scans:
        kinds = ("Index Scan", "Index Only Scan", *(("Bitmap Heap Scan",) * probe.whole_index))
        assert node["Node Type"] in kinds, summary
        assert _index_of(node) in probe.indexes, summary
    assert read < MAX_ROWS_READ and buffers < probe.buffers, summary
    return summary


# --- SQLite ------------------------------------------------------------------------------

_SQLITE_READ = re.compile(
    rf"^(SCAN|SEARCH) {TABLE}\b(?: USING (?:COVERING INDEX |INDEX )?(INTEGER PRIMARY KEY|\w+))?"
)


def _check_sqlite(backend: Any, probe: Probe) -> str:
    rows = backend.store.fetch(f"EXPLAIN QUERY PLAN {probe.sql}", probe.params)
    summary = " | ".join(row[3] for row in rows)
    reads = [(row[1], m) for row in rows if (m := _SQLITE_READ.match(row[3]))]
    assert reads, summary
    for _, read in reads:
        assert read[1] == "SEARCH" or probe.whole_index, summary
        assert read[2] in probe.indexes, summary
    if probe.whole_index:
        return summary
    # Rows read straight from the table are never sorted (all of them would be read first);
    # sorting the few rows each arm of a union returned is fine.
    sorted_under = {row[1] for row in rows if row[3].startswith("USE TEMP B-TREE")}
    assert not sorted_under & {parent for parent, _ in reads}, summary
    return summary


# --- MariaDB / MySQL ---------------------------------------------------------------------


def _tables(tree: Any) -> Iterator[dict[str, Any]]:
    if isinstance(tree, dict):
        if "table_name" in tree:
            yield tree
        for value in tree.values():
            yield from _tables(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _tables(value)


def _check_mysql(backend: Any, probe: Probe) -> str:
    [(raw,)] = backend.store.fetch(f"ANALYZE FORMAT=JSON {probe.sql}", probe.params)
    scans = [t for t in _tables(json.loads(raw)) if t["table_name"] == TABLE]
    read = sum(t.get("r_rows", 0) * t.get("r_loops", 1) for t in scans)
    shown = ", ".join(f"{t['access_type']} using {t.get('key')}" for t in scans)
    summary = f"{shown}; {read:.0f} rows read"
    assert scans, summary
    for scan in scans:
        assert scan["access_type"] in ("ref", "range") and scan.get("key") in probe.indexes, summary
    assert read < MAX_ROWS_READ, summary
    return summary


CHECKS = {"postgresql": _check_postgresql, "sqlite": _check_sqlite, "mysql": _check_mysql}


def _check_plans(backend: Any, loaded: Loaded, *, analyzed: bool = False) -> dict[str, str]:
    connection = backend.store.connection
    if connection.vendor == "mysql" and not connection.mysql_is_mariadb:
        return {}  # MySQL has no ANALYZE FORMAT=JSON: only the timings hold there
    check = CHECKS[connection.vendor]
    probes = _probes(backend, loaded, analyzed)
    return {name: check(backend, probe) for name, probe in probes.items()}


# --- timing ------------------------------------------------------------------------------


def _median(run: Callable[[], Any], undo: Callable[[Any], Any] = lambda _: None) -> float:
    """The median time of 5 runs of ``run``; ``undo`` its effect after each, untimed."""
    took = []
    for _ in range(5):
        start = time.perf_counter()
        done = run()
        took.append(time.perf_counter() - start)
        undo(done)
    return statistics.median(took)


def _timings(backend: Any) -> dict[str, float]:
    def give_back(jobs: list[Any]) -> None:
        assert jobs and backend.unclaim(jobs) == len(jobs)

    timings = {
        f"claim ({name})": _median(
            lambda s=selector: backend.claim("plans-worker", s, LIMIT), give_back
        )
        for name, selector in SELECTORS.items()
    }
    timings["next_due"] = _median(lambda: backend.next_due(QueueSelector()))
    timings["stage"] = _median(backend.stage)
    return timings


# --- the tests -----------------------------------------------------------------------------


def test_claims_and_next_due_read_only_their_rows(engine, backend, loaded):
    """Claims, staging and the next-due lookup read an index, a few rows of it."""
    _check_plans(backend, loaded)  # right after the rows arrived, before any statistics
    _analyze(backend)
    _check_plans(backend, loaded, analyzed=True)
    timings = _timings(backend)
    slow = {name: f"{took * 1000:.1f} ms" for name, took in timings.items() if took > BUDGET}
    assert not slow, f"over {BUDGET * 1000:.0f} ms: {slow}"


def test_verbs_return_the_right_jobs_among_many(engine, backend, loaded):
    """Claims take the best ready jobs of their queues, never a scheduled one."""
    emails = [i for i in loaded.first if loaded.queues[i] == "emails"] + loaded.last
    claimed = backend.claim("plans-worker", SELECTORS["emails"], LIMIT)
    assert [j.id for j in claimed] == emails
    assert backend.unclaim(claimed) == len(emails)

    claimed = backend.claim("plans-worker", SELECTORS["emails+default"], LIMIT)
    assert [j.id for j in claimed] == [*loaded.first, *loaded.last]
    assert backend.unclaim(claimed) == len(claimed)

    claimed = backend.claim("plans-worker", SELECTORS["all"], LIMIT)
    assert [j.id for j in claimed[:6]] == loaded.first
    assert [(j.queue_name, j.priority) for j in claimed[6:]] == [("reports", -10)] * (LIMIT - 6)
    assert backend.unclaim(claimed) == LIMIT

    assert backend.stage() == 0
    assert backend.next_due(QueueSelector()) == loaded.now + timedelta(days=1)

    start = time.perf_counter()
    stats = backend.stats()
    assert time.perf_counter() - start < STATS_BUDGET
    assert (stats.ready, stats.scheduled, stats.running) == (ROWS + 8, ROWS, 0)
    assert (stats.successful, stats.failed) == (ROWS, 0)
    third = ROWS // 3
    assert {q: c["scheduled"] for q, c in stats.by_queue.items()} == {
        "default": third,
        "emails": ROWS - 2 * third,
        "reports": third,
    }
