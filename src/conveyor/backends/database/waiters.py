"""Wake idle database workers when work may be there, instead of polling the jobs table.

PostgreSQL: LISTEN/NOTIFY. SQLite: the kernel reports writes to the database files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from typing import Any

from conveyor.backends.base import Waiter

logger = logging.getLogger(__name__)


class NotifyWaiter(Waiter):
    """Hold one LISTEN connection (outside Django's) and sleep on its socket.

    The process does not wake at all until a notification arrives, the timeout passes,
    or ``interrupt()`` writes to a pipe that the same ``select()`` watches.
    """

    def __init__(self, params: dict[str, Any], channel: str) -> None:
        super().__init__()
        self.params = {k: v for k, v in params.items() if k not in ("cursor_factory", "context")}
        self.channel = channel
        self.conn: Any = None
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(**self.params, autocommit=True)
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        return conn

    def _drain(self) -> bool:
        """Read every notification already here; say whether there was any."""
        return bool(list(self.conn.notifies(timeout=0.0)))

    def wait(self, timeout: float) -> bool:
        import psycopg

        if self.interrupted.is_set():
            return False
        try:
            if self.conn is None:
                self.conn = self._connect()
            if self._drain():
                return True
            ready, _, _ = select.select([self.conn.fileno(), self.wake_read], [], [], timeout)
            return self.conn.fileno() in ready and self._drain()
        except psycopg.Error as e:
            logger.warning("LISTEN connection failed (%s); polling until it is back.", e)
            self._close_connection()
            self.interrupted.wait(timeout)
            return False

    def interrupt(self) -> None:
        super().interrupt()
        if self.wake_write >= 0:
            with contextlib.suppress(OSError):  # a full pipe wakes the waiter all the same
                os.write(self.wake_write, b"x")

    def _close_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def close(self) -> None:
        self._close_connection()
        for fd in (self.wake_read, self.wake_write):
            if fd >= 0:
                os.close(fd)
        self.wake_read = self.wake_write = -1


INOTIFY_SLICE = 0.25  # longest block on file events before looking for a stop request
STAT_SLICE = 0.1  # how often the files' times are read where inotify is missing


class FileChangeWaiter(Waiter):
    """Wake when the database file or its write-ahead log is written (every commit is).

    On Linux the kernel reports the writes (inotify), so an idle worker costs nothing
    until something is committed; elsewhere it compares the files' times every 100 ms.
    Either way no table is read until there may be work.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.names = {os.path.basename(path), f"{os.path.basename(path)}-wal"}
        self.paths = [os.path.join(os.path.dirname(path) or ".", name) for name in self.names]
        self.seen: tuple[int, ...] | None = None
        self.inotify: Any = _watch(os.path.dirname(path) or ".")

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.interrupted.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.inotify is not None:
                events = self.inotify.read(timeout=int(min(left, INOTIFY_SLICE) * 1000))
                if any(event.name in self.names for event in events):
                    return True
            elif self._changed() or self.interrupted.wait(min(left, STAT_SLICE)):
                return self._changed()
        return False

    def _changed(self) -> bool:
        state: list[int] = []
        for path in self.paths:
            try:
                info = os.stat(path)
            except FileNotFoundError:
                state += [0, 0]
            else:
                state += [info.st_mtime_ns, info.st_size]
        changed = self.seen is not None and tuple(state) != self.seen
        self.seen = tuple(state)
        return changed

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


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
            "Cannot watch %s with inotify (%s); looking at file times instead.", directory, e
        )
        return None
    return inotify
