"""How a worker process waits: for work while idle, and while its store cannot be reached.

Where the store wakes workers (``supports_wakeup``), an idle process waits on its waiter
until a job falls due, a timed pause ends, or ``IDLE_WAKEUP_WAIT`` passes, and then claims at
once. Elsewhere it polls, each wait twice the last (from ``MIN_POLL``) up to the backend's
poll interval. Scheduled jobs that fell due are made ready at most every ``STAGE_EVERY``
seconds. A store that cannot be reached is tried again after waits of ``STORE_BACKOFF``.
"""

from __future__ import annotations

import contextlib
import logging
import time

from django.db import close_old_connections
from django.utils import timezone

from conveyor.backends.base import StoreBackend, Waiter
from conveyor.records import QueueSelector
from conveyor.runtime.pauses import Pauses

logger = logging.getLogger(__name__)

MIN_POLL = 0.005  # first idle wait where nothing wakes workers; doubles to POLL_INTERVAL
IDLE_WAKEUP_WAIT = 5.0  # with wake-ups, the longest idle wait when nothing is due
STAGE_EVERY = 0.05  # how often a busy process makes due scheduled jobs ready
STORE_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # waits while the store cannot be reached


class StoreTrouble:
    """Failures to reach the store in a row: the first is logged, each makes a longer wait."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.errors = 0

    def failed(self, what: str, error: Exception) -> None:
        """Note that the process could not ``what`` (logged the first time in a row)."""
        close_old_connections()
        self.errors += 1
        log = logger.warning if self.errors == 1 else logger.debug
        log(
            "Worker %s could not %s (%s: %s); retrying.",
            self.worker_id,
            what,
            type(error).__name__,
            error,
        )

    def ok(self) -> None:
        """Note that the store answered again."""
        if self.errors:
            logger.info("Worker %s reaches the store again.", self.worker_id)
        self.errors = 0

    def backoff(self) -> float:
        """How long to wait before trying the store again."""
        return STORE_BACKOFF[min(self.errors, len(STORE_BACKOFF)) - 1]


class Idle:
    """The idle waits of one process, and when it next makes due scheduled jobs ready."""

    def __init__(
        self,
        backend: StoreBackend,
        worker_id: str,
        queues: QueueSelector,
        pauses: Pauses,
        trouble: StoreTrouble,
    ) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.queues = queues
        self.pauses = pauses
        self.trouble = trouble
        self.waiter: Waiter = Waiter()
        self.wakeups = False
        self.emptied = False  # the last claim left nothing behind, and nothing woke us since
        self.waited = False  # it waited for work since its last claim
        # Its last idle wait was ended by a wake-up (another connection's commit on SQLite,
        # a notification on PostgreSQL), and it has not claimed since.
        self.woke = False
        self.next_stage = 0.0
        self.poll = MIN_POLL

    def open(self) -> None:
        """Start listening for wake-ups, where the store sends them."""
        self.waiter = self.backend.waiter(self.queues)
        self.wakeups = self.backend.supports_wakeup

    def interrupt(self) -> None:
        """End the current wait and every later one (the process is stopping)."""
        self.waiter.interrupt()

    def close(self) -> None:
        """Release what the waiter holds."""
        self.waiter.close()

    def claiming(self) -> None:
        """A claim begins: make due scheduled jobs ready first, if it is their turn."""
        self.emptied = False
        self.woke = False
        self.stage()
        self.waiter.claiming()

    def claimed(self, found: int, room: int) -> None:
        """A claim found ``found`` jobs where there was ``room``."""
        self.emptied = self.wakeups and found < room
        if found:
            self.poll = MIN_POLL

    def stage(self, force: bool = False) -> None:
        """Make scheduled jobs that fell due ready, at most every ``STAGE_EVERY`` seconds."""
        now = time.monotonic()
        if force or now >= self.next_stage:
            self.next_stage = now + STAGE_EVERY
            self.backend.stage()

    def wait(self) -> None:
        """Wait for work; where nothing wakes workers, each wait is longer than the last."""
        self.waited = True
        if not self.wakeups:
            self._wait_for_work(self.poll)
            self.poll = min(self.poll * 2, self.backend.conveyor_options.poll_interval)
            return
        # Woken workers need no ladder: a wake that finds nothing waits long again.
        woke = self._wait_for_work(self._until_due())
        self.emptied = False
        self.woke = woke
        if woke:
            # New ready work: claim it first. Nothing was due when the wait began (it
            # would have been staged), so staging can wait its usual turn.
            self.next_stage = max(self.next_stage, time.monotonic() + STAGE_EVERY)
        else:
            self.next_stage = 0.0  # a due time may have come

    def wait_briefly(self, timeout: float) -> None:
        """Wait up to ``timeout``, or until a commit where the store wakes workers (a
        sibling's claim that was under way ends with one); then the process claims."""
        self.woke = False
        self._wait_for_work(timeout)

    def _until_due(self) -> float:
        """How long an idle worker may wait: until a job falls due or a timed pause ends."""
        return min(self._until_job_due(), self._until_pause_ends())

    def _until_pause_ends(self) -> float:
        """Until the first timed pause of a queue served here ends (nothing wakes workers
        then); a pause that seems over by this machine's clock is looked at every poll."""
        left = self.pauses.first_end_in()
        if left is None:
            return IDLE_WAKEUP_WAIT
        return left if left > 0 else self.backend.conveyor_options.poll_interval

    def _until_job_due(self) -> float:
        try:
            due = self.backend.next_due(self.queues)
        except Exception as e:
            self.trouble.failed("read the next due time", e)
            return self.trouble.backoff()
        if due is None:
            return IDLE_WAKEUP_WAIT
        left = (due - timezone.now()).total_seconds()
        if left > MIN_POLL:
            return min(left, IDLE_WAKEUP_WAIT)
        # Due by this machine's clock; the store's clock decides, which may run behind.
        try:
            staged = self.backend.stage()
        except Exception as e:
            self.trouble.failed("make due jobs ready", e)
            return self.trouble.backoff()
        return 0.0 if staged else self.backend.conveyor_options.poll_interval

    def _wait_for_work(self, timeout: float) -> bool:
        try:
            return self.waiter.wait(timeout)
        except Exception as e:
            logger.warning(
                "Worker %s cannot wait for wake-ups (%s: %s); polling every %.2fs instead.",
                self.worker_id,
                type(e).__name__,
                e,
                self.backend.conveyor_options.poll_interval,
            )
            with contextlib.suppress(Exception):  # what it holds (a file watch, a socket)
                self.waiter.close()
            self.waiter = Waiter()
            self.wakeups = False
            self.waiter.wait(min(timeout, self.backend.conveyor_options.poll_interval))
            return False
