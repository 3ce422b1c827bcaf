"""Wake idle workers with PostgreSQL LISTEN/NOTIFY instead of a sleep loop."""

from __future__ import annotations

import logging
import time
from typing import Any

from conveyor.backends.base import Waiter

logger = logging.getLogger(__name__)

SLICE = 0.25


class NotifyWaiter(Waiter):
    """Hold one LISTEN connection (outside Django's pool) and block on it."""

    def __init__(self, params: dict[str, Any], channel: str) -> None:
        super().__init__()
        self.params = {k: v for k, v in params.items() if k not in ("cursor_factory", "context")}
        self.channel = channel
        self.conn: Any = None

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(**self.params, autocommit=True)
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        return conn

    def wait(self, timeout: float) -> bool:
        import psycopg

        try:
            if self.conn is None:
                self.conn = self._connect()
            woke = False
            deadline = time.monotonic() + timeout
            # Short slices, so that a stop request is seen within a quarter second.
            while not woke and not self.interrupted.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Exhaust the generator: a suspended one keeps the connection's lock.
                woke = bool(list(self.conn.notifies(timeout=min(left, SLICE), stop_after=1)))
            if woke:
                # Fold a burst of notifications into one wake-up.
                for _ in self.conn.notifies(timeout=0.0):
                    pass
            return woke
        except psycopg.Error as e:
            logger.warning("LISTEN connection failed (%s); polling until it is back.", e)
            self.close()
            self.interrupted.wait(timeout)
            return False

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None
