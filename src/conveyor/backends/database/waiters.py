"""Wake idle database workers when work may be there, instead of polling the jobs table.

PostgreSQL: LISTEN/NOTIFY, each notification naming the queue it is about. SQLite: the
kernel reports writes to the database files, and ``PRAGMA data_version`` says whether
one of them was a commit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import sqlite3
import time
from typing import Any
from urllib.parse import quote

from django.db import DatabaseError, connections

from conveyor.backends.base import Waiter
from conveyor.records import QueueSelector

logger = logging.getLogger(__name__)

# The LISTEN connection is idle for long stretches: let the kernel probe it, so a peer
# that vanished without a word (a failover, a dropped NAT entry) is noticed in ~25 s.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
TCP_USER_TIMEOUT_MS = 30_000  # give up on a statement the server never acknowledges
CONNECT_TIMEOUT = 5  # seconds; a stop request waits for a connection attempt to end
PING_AFTER = 30.0  # a LISTEN connection silent this long is checked with a no-op


def psycopg_installed() -> bool:
    """Say whether psycopg 3, which LISTEN/NOTIFY needs, can be imported."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


_told_polling: set[str] = set()


def polling_waiter(backend: str, database: str) -> Waiter:
    """The plain waiter for a PostgreSQL backend without psycopg 3; say so once."""
    if backend not in _told_polling:
        _told_polling.add(backend)
        logger.info(
            "Backend %r: psycopg 3 is not installed, so idle workers of PostgreSQL database "
            "%r poll every POLL_INTERVAL instead of being woken by LISTEN/NOTIFY.",
            backend,
            database,
        )
    return Waiter()


class NotifyWaiter(Waiter):
    """Hold one LISTEN connection (outside Django's) and sleep on its socket.

    The process does not wake at all until a notification arrives, the timeout passes,
    or ``interrupt()`` writes to a pipe that the same ``select()`` watches. A notification
    about a queue the worker does not serve is read and ignored; an empty one (jobs put
    back, queues unknown) wakes every worker.
    """

    def __init__(
        self,
        params: dict[str, Any],
        channel: str,
        queues: QueueSelector | None = None,
        retry_every: float = 0.5,
    ) -> None:
        super().__init__()
        self.params = _listen_params(params)
        self.channel = channel
        self.queues = queues or QueueSelector()
        self.retry_every = retry_every  # the wait between connection attempts
        self.conn: Any = None
        self.lost = False  # the connection failed and is not back yet
        self.quiet_since = 0.0  # when the connection last proved alive
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def wait(self, timeout: float) -> bool:
        """Wait for a wanted notification; True at once after (re)connecting.

        Jobs enqueued while nobody listened sent their notifications to no one, so a new
        connection tells the worker to look now.
        """
        import psycopg

        deadline = time.monotonic() + timeout
        if self.conn is not None:
            try:
                return self._listen(deadline)
            except psycopg.Error as e:
                self._failed(e)
        return self._reconnect(deadline)

    def _listen(self, deadline: float) -> bool:
        while not self.interrupted.is_set():
            if self._drain():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            ping_at = self.quiet_since + PING_AFTER
            if now >= ping_at:
                self._ping()
                continue
            until = min(deadline, ping_at) - now
            select.select([self.conn.fileno(), self.wake_read], [], [], until)
        return False

    def _drain(self) -> bool:
        """Read every notification already here; say whether one is for this worker."""
        notes = list(self.conn.notifies(timeout=0.0))
        if notes:
            self.quiet_since = time.monotonic()
        return any(not note.payload or self.queues.allows(note.payload) for note in notes)

    def _ping(self) -> None:
        # Recent psycopg keeps a notification arriving meanwhile for the next
        # ``notifies()``; where one is dropped, the worker looks at its next timeout.
        self.conn.execute("SELECT 1")
        self.quiet_since = time.monotonic()

    def _reconnect(self, deadline: float) -> bool:
        import psycopg

        if self.interrupted.is_set():
            return False
        try:
            self.conn = self._connect()
        except psycopg.Error as e:
            self._failed(e)
            self.interrupted.wait(max(min(deadline - time.monotonic(), self.retry_every), 0.0))
            return False
        if self.lost:
            logger.info("LISTEN connection on channel %s is back.", self.channel)
            self.lost = False
        return True

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(**self.params, autocommit=True)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            conn.close()
            raise
        self.quiet_since = time.monotonic()
        return conn

    def _failed(self, error: Exception) -> None:
        self._close_connection()
        if self.lost:
            logger.debug("LISTEN connection on channel %s still failing: %s", self.channel, error)
            return
        self.lost = True
        logger.warning(
            "LISTEN connection on channel %s failed (%s); polling every %.2fs until it is back.",
            self.channel,
            " ".join(str(error).split()),  # one line
            self.retry_every,
        )

    def interrupt(self) -> None:
        super().interrupt()
        if self.wake_write >= 0:
            with contextlib.suppress(OSError):  # a full pipe wakes the waiter all the same
                os.write(self.wake_write, b"x")

    def _close_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # it is being dropped for failing already
                conn.close()

    def close(self) -> None:
        self._close_connection()
        for fd in (self.wake_read, self.wake_write):
            if fd >= 0:
                os.close(fd)
        self.wake_read = self.wake_write = -1


def _listen_params(params: dict[str, Any]) -> dict[str, Any]:
    """Django's connection parameters for a plain psycopg connection that stays up."""
    from psycopg import pq

    listen = {k: v for k, v in params.items() if k not in ("cursor_factory", "context")}
    extra: dict[str, Any] = {**KEEPALIVES, "connect_timeout": CONNECT_TIMEOUT}
    if pq.version() >= 120000:  # libpq 12 added tcp_user_timeout
        extra["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
    return {**extra, **listen}  # what the project set wins


SETTLE_LOOKS = (0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064)  # between looks
RECHECK = 0.05  # after a write that was no visible commit, look again this soon
INOTIFY_SLICE = 0.25  # longest block on file events before looking for a stop request
POLL_SLICE = 0.1  # how often data_version is read where inotify is missing


class FileChangeWaiter(Waiter):
    """Wake when another connection commits to the SQLite database.

    On Linux the kernel reports writes to the database file and its write-ahead log
    (inotify), so an idle worker costs nothing until something is written. Every report is
    checked with ``PRAGMA data_version``, which changes only when another connection
    committed: checkpoints, a new ``-wal`` file and rolled-back writes wake nobody. A
    worker process reads it on its own bookkeeping connection (``own``, a database alias),
    so its claims and saves do not wake it either; its writes that make jobs ready again
    (a retry, a put-back) wake it through ``poke()`` instead, as they send a NOTIFY on
    PostgreSQL. Otherwise the waiter opens a read-only connection of its own. Where inotify
    is missing, data_version is read every 100 ms. No table is read until there may be work.
    """

    def __init__(self, path: str, own: str | None = None) -> None:
        super().__init__()
        self.names = {os.path.basename(path), f"{os.path.basename(path)}-wal"}
        self.inotify: Any = _watch(os.path.dirname(path) or ".")
        self.own = own
        self.db = None if own is not None else _open_read_only(path)
        self.readable = own is not None or self.db is not None
        self.poked = False
        # A data_version means something only on the connection that read it: the one
        # read on is kept with it (a reopened connection starts its count afresh).
        self.read_on: object = None
        self.version = self._version()

    def poke(self) -> None:
        """The worker itself made jobs ready: its next wait ends at once."""
        self.poked = True

    def claiming(self) -> None:
        """A claim begins: it sees what the worker made ready, so no wait ends for that."""
        self.poked = False

    def wait(self, timeout: float) -> bool:
        """Wait for a commit; True at once if there was one since the last look.

        The version is carried over from the previous wait, so a commit made between the
        worker's last claim and this wait is not missed. File events queued before the
        wait (the worker's own writes among them) are dropped unread; should one of them
        be a commit still landing, the first look comes after ``RECHECK``.
        """
        deadline = time.monotonic() + timeout
        recheck = self._written(0.0)
        if self._committed() or self.poked:
            self.poked = False
            return True
        while not self.interrupted.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._written(min(left, RECHECK if recheck else INOTIFY_SLICE)):
                if not self.readable or self.version is None or self._committed_soon():
                    return True
                recheck = True
            elif self._committed():  # a commit whose file event came before its index update
                return True
            else:
                recheck = False
        return False

    def _committed_soon(self) -> bool:
        """After a write to the files: say whether it was a commit, allowing it to land.

        A commit appends to the ``-wal`` file first and then updates the shared index
        (``-shm``, memory-mapped: no file event), where ``data_version`` reads it; with
        ``synchronous=FULL`` a flush to disk comes in between. A few looks over ~13 ms;
        one landing later is found by the look after ``RECHECK``.
        """
        for pause in SETTLE_LOOKS:
            if self._committed():
                return True
            if self.interrupted.wait(pause):
                return False
        return self._committed()

    def _written(self, left: float) -> bool:
        """Wait a slice of ``left``; say whether the database files may have changed."""
        if self.inotify is None:
            return left > 0 and not self.interrupted.wait(min(left, POLL_SLICE))
        # Every event queued so far is read (and dropped): the worker's own commits
        # leave none behind to wake it again and again.
        # Whole milliseconds, rounded up: a wait of less than one would return at once, and
        # the last millisecond before a deadline would be spent reading data_version.
        events = self.inotify.read(timeout=math.ceil(min(left, INOTIFY_SLICE) * 1000))
        return any(event.name in self.names for event in events)

    def _committed(self) -> bool:
        """Say whether some other connection committed since the last look."""
        if not self.readable:
            return False
        read_on = self.read_on
        version = self._version()
        changed = version != self.version or self.read_on is not read_on
        self.version = version
        return changed

    def _version(self) -> int | None:
        try:
            if self.own is not None:
                return self._own_version()
            if self.db is None:
                return None
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])
        except (sqlite3.Error, DatabaseError) as e:
            if self.own is not None:
                # Woken once for it (the loop's claim meets the same trouble and backs off);
                # until a read works again, every file event wakes.
                logger.debug("Cannot read PRAGMA data_version (%s); waking to look.", e)
                return None
            logger.info("Cannot read PRAGMA data_version (%s); every file event wakes.", e)
            self._close_db()
            return None

    def _own_version(self) -> int:
        """data_version on the worker's own connection, read on the driver's connection
        (nothing for debug logs or query instrumentation to record at every look)."""
        conn = connections[self.own or ""]
        conn.ensure_connection()
        with conn.wrap_database_errors:
            raw = conn.connection
            value = int(raw.execute("PRAGMA data_version").fetchone()[0])
        self.read_on = raw
        return value

    def _close_db(self) -> None:
        db, self.db = self.db, None
        self.readable = self.own is not None
        if db is not None:
            db.close()

    def close(self) -> None:
        self._close_db()
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


def _open_read_only(path: str) -> sqlite3.Connection | None:
    try:
        return sqlite3.connect(
            f"file:{quote(os.path.abspath(path))}?mode=ro",
            uri=True,
            timeout=5.0,
            check_same_thread=False,  # the loop thread waits, any thread may close
        )
    except sqlite3.Error as e:
        logger.info("Cannot open %s read-only (%s); every file event wakes.", path, e)
        return None


def _watch(directory: str) -> Any:
    try:
        from inotify_simple import INotify, flags
    except ImportError:
        return None
    try:
        inotify = INotify()
        inotify.add_watch(directory, flags.MODIFY | flags.CREATE | flags.MOVED_TO)
    except OSError as e:
        logger.info(
            "Cannot watch %s with inotify (%s); reading data_version every 100 ms instead.",
            directory,
            e,
        )
        return None
    return inotify
