"""Wake idle workers on SQLite when any connection commits, without querying the jobs."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from conveyor.backends.base import Waiter

logger = logging.getLogger(__name__)

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
