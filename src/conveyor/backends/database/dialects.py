"""What differs between SQLite, PostgreSQL and MySQL/MariaDB, in one place per engine.

The transitions are written once, in the ``transitions`` package, and ask a dialect for
the few pieces of SQL that differ: the store's clock, JSON appends, typed parameters, row
locks, and the shape of a claim. Like Django's ``connection.ops``, one object per engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.utils import DatabaseError

from conveyor import clock

SUPPORTED_VENDORS = ("sqlite", "postgresql", "mysql")
LOCK_WAIT = 2.0  # seconds ``short_waits`` waits for another transaction's lock
Statement = tuple[str, list[Any]]  # SQL with %s marks, and its parameters


class Dialect:
    """The SQL pieces of one engine; ``%s`` marks one parameter."""

    vendor = ""
    # UPDATE ... RETURNING exists, so a claim is one statement.
    update_returning = True
    # Text appended to a SELECT that locks its rows, skipping rows others hold.
    lock_rows = ""
    # Text appended to a SELECT that must see rows other transactions committed since this
    # one's snapshot (a plain read does at READ COMMITTED, each statement a new snapshot).
    read_latest = ""
    # A claim looks (a read) before it writes: its UPDATE would take the write lock even
    # when it matches nothing.
    probe_before_claim = False
    # ``StateIndex`` makes indexes led by the state (the engine has no partial indexes): a
    # read of the newest finished rows in some states goes one state at a time.
    state_led_indexes = False

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.use_tz = bool(settings.USE_TZ)

    def now(self) -> str:
        """The store's clock, as the engine stores a datetime."""
        raise NotImplementedError

    def reached(self) -> str:
        """The store's clock, to compare with times Django wrote (``<= reached()``: due)."""
        return self.now()

    def later(self) -> str:
        """The store's clock plus ``%s`` seconds."""
        raise NotImplementedError

    def earlier(self) -> str:
        """The store's clock minus ``%s`` seconds."""
        raise NotImplementedError

    def json_value(self) -> str:
        """A parameter holding JSON text, typed for a JSON column."""
        return "%s"

    def time_value(self) -> str:
        """A parameter holding a datetime, typed for a datetime column."""
        return "%s"

    def epoch_seconds(self, column: str) -> str:
        """Whole seconds from the epoch to a datetime column's value, read as it is stored."""
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM {column})) AS BIGINT)"

    def epoch_step(self, column: str, step: int) -> str:
        """Which interval of ``step`` seconds from the epoch a datetime column's value is in."""
        return f"{self.epoch_seconds(column)} / {int(step)}"  # whole numbers: whole division

    def append_text(self, column: str) -> str:
        """``column`` (a JSON array) with the string parameter ``%s`` appended."""
        raise NotImplementedError

    def append_json(self, column: str) -> str:
        """``column`` (a JSON array) with the JSON text parameter ``%s`` appended as a value."""
        raise NotImplementedError

    def claim_statement(
        self, table: str, pick: Statement, assign: Statement, columns: str
    ) -> Statement:
        """One statement that takes the rows ``pick`` selects (``id`` first) and returns them."""
        raise NotImplementedError

    def missing_table(self, error: DatabaseError) -> bool:
        """Say whether ``error`` means the tables were never created (no ``migrate``)."""
        return False

    def deadlock(self, error: DatabaseError) -> bool:
        """Say whether ``error`` means the engine chose this transaction as a deadlock's victim."""
        return False

    def returning_ids(self, update: str, channel: str) -> Statement:
        """``update`` returning the ids it changed, and telling ``channel``'s listeners."""
        return f"{update} RETURNING id", []

    def insert_unless_taken(self, insert: str, column: str) -> str:
        """``insert``, skipping each row whose ``column`` another row holds (and no other).

        Only a clash on that unique column is skipped: any other error is still raised.
        """
        return f"{insert} ON CONFLICT ({column}) DO NOTHING"

    def announce(self, channel: str) -> Statement | None:
        """A statement telling ``channel``'s listeners that jobs ended; None if none listen."""
        return None

    def gave_up_waiting(self, error: DatabaseError) -> bool:
        """Say whether ``error`` means a lock wait ran past ``short_waits``' bound."""
        return False

    def serialize(self, name: str) -> None:
        """Make transactions that call this with ``name`` run one at a time, till they end."""

    @contextmanager
    def short_waits(self) -> Iterator[None]:
        """A write transaction that gives up waiting for another's locks after ``LOCK_WAIT``.

        For work a supervisor does between heartbeats (firing schedules): a user's
        transaction holding a row it needs must not stop the heartbeats. Inside a caller's
        transaction the caller's settings stand.
        """
        with self.write_transaction():
            yield

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        """A transaction that may write; on SQLite it takes the write lock at once."""
        with transaction.atomic(using=self.connection.alias):
            yield


class SQLiteDialect(Dialect):
    vendor = "sqlite"
    probe_before_claim = True  # one write lock for the whole database

    def _clock(self, shift: str = "") -> str:
        moved = f", '{clock.offset():+.6f} seconds'" if clock.offset() else ""
        zone = "" if self.use_tz else ", 'localtime'"
        return f"strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now'{moved}{zone}{shift})"

    def now(self) -> str:
        return self._clock()

    def reached(self) -> str:
        # %f has milliseconds; Django writes microseconds, and the columns compare as text:
        # "...:25.963412" sorts after "...:25.963". Compared, the clock reads as the end of
        # its millisecond.
        return f"({self._clock()} || '999')"

    def later(self) -> str:
        return self._clock(", '+' || %s || ' seconds'")

    def earlier(self) -> str:
        return self._clock(", '-' || %s || ' seconds'")

    def append_text(self, column: str) -> str:
        return f"json_insert({column}, '$[#]', %s)"

    def epoch_seconds(self, column: str) -> str:
        return f"CAST(strftime('%%s', {column}) AS INTEGER)"

    def append_json(self, column: str) -> str:
        return f"json_insert({column}, '$[#]', json(%s))"

    def claim_statement(
        self, table: str, pick: Statement, assign: Statement, columns: str
    ) -> Statement:
        # One UPDATE takes the write lock before it reads, so the rows it picks are its own.
        return (
            f"UPDATE {table} SET {assign[0]} WHERE id IN (SELECT id FROM ({pick[0]})) "
            f"AND state = 'ready' RETURNING {columns}",
            [*assign[1], *pick[1]],
        )

    def missing_table(self, error: DatabaseError) -> bool:
        return "no such table" in str(error)

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        # A deferred transaction that reads first may fail to upgrade to a write when
        # another connection wrote meanwhile ("database is locked", without waiting).
        # BEGIN IMMEDIATE makes writers queue on the busy timeout instead.
        conn: Any = self.connection
        if conn.in_atomic_block:
            with transaction.atomic(using=conn.alias):
                yield
            return
        conn.ensure_connection()
        previous = conn.transaction_mode
        conn.transaction_mode = "IMMEDIATE"
        try:
            with transaction.atomic(using=conn.alias):
                conn.transaction_mode = previous  # BEGIN IMMEDIATE has been sent
                yield
        finally:
            conn.transaction_mode = previous


class PostgreSQLDialect(Dialect):
    vendor = "postgresql"
    lock_rows = " FOR UPDATE SKIP LOCKED"

    def returning_ids(self, update: str, channel: str) -> Statement:
        # Only for jobs someone waits for: PostgreSQL serializes the commits that notify.
        # Delivered on commit, once per transaction however many rows: no extra round trip.
        return (
            f"WITH done AS ({update} RETURNING id, awaited) "
            "SELECT done.id FROM done LEFT JOIN LATERAL "
            "(SELECT pg_notify(%s, '') WHERE done.awaited) AS announced ON TRUE",
            [channel],
        )

    def announce(self, channel: str) -> Statement | None:
        return "SELECT pg_notify(%s, '')", [channel]

    def deadlock(self, error: DatabaseError) -> bool:
        return _sqlstate(error) == "40P01"

    def gave_up_waiting(self, error: DatabaseError) -> bool:
        return _sqlstate(error) == "55P03"

    def serialize(self, name: str) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [name])

    @contextmanager
    def short_waits(self) -> Iterator[None]:
        outermost = not self.connection.in_atomic_block
        with self.write_transaction():
            if outermost:
                # Also: a client that vanished (its machine, or the network to it) inside
                # the transaction would hold its row locks until TCP gives up, hours later.
                with self.connection.cursor() as cursor:
                    cursor.execute(
                        f"SET LOCAL lock_timeout = '{LOCK_WAIT * 1000:.0f}ms'; "
                        "SET LOCAL idle_in_transaction_session_timeout = '30s'"
                    )
            yield

    def now(self) -> str:
        if clock.offset():
            return f"(statement_timestamp() + interval '{clock.offset():.6f} seconds')"
        return "statement_timestamp()"

    def later(self) -> str:
        return f"({self.now()} + %s * interval '1 second')"

    def earlier(self) -> str:
        return f"({self.now()} - %s * interval '1 second')"

    def json_value(self) -> str:
        return "%s::jsonb"

    def time_value(self) -> str:
        return "%s::timestamptz"

    def append_text(self, column: str) -> str:
        return f"({column} || to_jsonb((%s)::text))"

    def append_json(self, column: str) -> str:
        return f"({column} || jsonb_build_array(%s::jsonb))"

    def claim_statement(
        self, table: str, pick: Statement, assign: Statement, columns: str
    ) -> Statement:
        # MATERIALIZED: the locking subquery runs once, so exactly ``limit`` rows are taken.
        return (
            f"WITH picked AS MATERIALIZED ({pick[0]}) UPDATE {table} SET {assign[0]} "
            f"FROM picked WHERE {table}.id = picked.id RETURNING {columns}",
            [*pick[1], *assign[1]],
        )

    def missing_table(self, error: DatabaseError) -> bool:
        return _sqlstate(error) == "42P01"

    def notify_after(self, sql: str) -> str:
        """Wrap an INSERT so that the same statement sends one NOTIFY (``%s``, ``%s``)."""
        return (
            f"WITH inserted AS ({sql} RETURNING 1) "
            "SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM inserted LIMIT 1) AS one"
        )


class MySQLDialect(Dialect):
    vendor = "mysql"
    update_returning = False
    lock_rows = " FOR UPDATE SKIP LOCKED"
    # A locking read sees the latest committed rows at any isolation level (REPEATABLE READ
    # included); MariaDB has no FOR SHARE.
    read_latest = " LOCK IN SHARE MODE"
    state_led_indexes = True

    def now(self) -> str:
        now = "UTC_TIMESTAMP(6)" if self.use_tz else "NOW(6)"
        if clock.offset():
            return f"({now} + INTERVAL {round(clock.offset() * 1_000_000)} MICROSECOND)"
        return now

    def later(self) -> str:
        return f"({self.now()} + INTERVAL ROUND(%s * 1000000) MICROSECOND)"

    def epoch_seconds(self, column: str) -> str:
        # Not UNIX_TIMESTAMP(), which reads the value in the session's time zone.
        return f"TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', {column})"

    def epoch_step(self, column: str, step: int) -> str:
        return f"{self.epoch_seconds(column)} DIV {int(step)}"  # "/" divides to decimals

    def earlier(self) -> str:
        return f"({self.now()} - INTERVAL ROUND(%s * 1000000) MICROSECOND)"

    def append_text(self, column: str) -> str:
        return f"JSON_ARRAY_APPEND({column}, '$', %s)"

    def append_json(self, column: str) -> str:
        return f"JSON_ARRAY_APPEND({column}, '$', JSON_EXTRACT(%s, '$'))"

    def insert_unless_taken(self, insert: str, column: str) -> str:
        # No conflict target: a clash on any unique column becomes this no-op write; the
        # only other is the random result id. INSERT IGNORE would hide every error.
        return f"{insert} ON DUPLICATE KEY UPDATE id = id"

    def claim_statement(
        self, table: str, pick: Statement, assign: Statement, columns: str
    ) -> Statement:
        raise NotImplementedError("MySQL has no UPDATE ... RETURNING; claims lock, then update")

    def missing_table(self, error: DatabaseError) -> bool:
        return bool(error.args) and error.args[0] == 1146

    def deadlock(self, error: DatabaseError) -> bool:
        # InnoDB takes next-key locks on the unique index while several transactions insert
        # and clear the same key: one of them may be rolled back as a deadlock's victim.
        return bool(error.args) and error.args[0] == 1213

    def gave_up_waiting(self, error: DatabaseError) -> bool:
        return bool(error.args) and error.args[0] == 1205

    @contextmanager
    def short_waits(self) -> Iterator[None]:
        if self.connection.in_atomic_block:
            with self.write_transaction():
                yield
            return
        with self.connection.cursor() as cursor:
            cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(LOCK_WAIT))}")
        try:
            with self.write_transaction():
                yield
        finally:
            with self.connection.cursor() as cursor:
                cursor.execute("SET SESSION innodb_lock_wait_timeout = DEFAULT")


def _sqlstate(error: DatabaseError) -> str | None:
    return getattr(getattr(error, "__cause__", None), "sqlstate", None)


_DIALECTS: dict[str, type[Dialect]] = {
    "sqlite": SQLiteDialect,
    "postgresql": PostgreSQLDialect,
    "mysql": MySQLDialect,
}


def dialect_for(connection: BaseDatabaseWrapper) -> Dialect:
    """The dialect of ``connection``'s engine; raise for an engine Conveyor does not know."""
    try:
        return _DIALECTS[connection.vendor](connection)
    except KeyError:
        raise DatabaseError(
            f"Conveyor does not support the {connection.vendor} database; it supports "
            f"{', '.join(SUPPORTED_VENDORS)}."
        ) from None
