"""Wake idle workers with PostgreSQL LISTEN/NOTIFY instead of a sleep loop."""

from __future__ import annotations

import contextlib
import logging
import os
import select
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
