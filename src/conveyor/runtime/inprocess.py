"""Run jobs in the calling process and thread: no fork, no supervisor, one job at a time.

For tests and scripts (``conveyor.testing.run_until_done``, ``manage.py conveyor worker
--in-process``). It drives the same ``Loop`` as a worker process, so tasks get the same
signals, middleware and outcomes. What the supervisor does for a worker process is done
here in small: the worker is registered in the workers registry and ended there, a lease
keeper thread renews the delivery it holds, and whatever the store still has leased to it
when the loop ends is put back.

Jobs are claimed one at a time on the caller's own database connection, so inside a
``TestCase`` the worker sees the jobs the test enqueued but did not commit, and its writes
roll back with the test. Inside a transaction no lease keeper runs: nothing outside the
transaction sees the claims, and a second connection would wait on its locks.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from django.db import connections
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, Task
from django.utils import timezone

from conveyor import clock
from conveyor.backends.base import Held, StoreBackend, worker_store
from conveyor.records import Job, Outcome, QueueSelector, WorkerInfo, new_worker_id
from conveyor.runtime.channel import Slots
from conveyor.runtime.loop import Loop, WorkerConfig
from conveyor.runtime.middleware import DEFAULT_MIDDLEWARE, Middleware
from conveyor.runtime.scheduler import SchedulerThread

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INTERRUPTED = 1  # a second stop signal interrupted the worker
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CANCEL_LOOK = 1.0  # how often a running job is checked for a cancel request, in seconds
KEEPER_JOIN = 5.0  # longest the worker waits for the lease keeper's last heartbeat


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """The outcomes an in-process run recorded, by kind."""

    succeeded: int = 0
    failed: int = 0
    retried: int = 0  # failed this time, scheduled to run again
    snoozed: int = 0  # asked to run again later, no failure counted
    unrecorded: int = 0  # refused by the store: the job had already ended or moved on

    @property
    def ran(self) -> int:
        """How many jobs ran (each retry counts once more)."""
        return self.succeeded + self.failed + self.retried + self.snoozed + self.unrecorded


class InProcessWorker:
    """Run jobs in this thread with the worker's loop; ``run()`` returns an exit code."""

    def __init__(
        self,
        backend_alias: str = DEFAULT_TASK_BACKEND_ALIAS,
        queues: QueueSelector | None = None,
        *,
        until_done: bool = True,
        max_tasks: int | None = None,
        stop_on_signals: bool = False,
        scheduler: bool = False,
    ) -> None:
        self.alias = backend_alias
        self.scheduler = scheduler  # fire due schedules from a thread beside the jobs
        self.queues = queues or QueueSelector()
        self.until_done = until_done
        self.max_tasks = max_tasks
        self.stop_on_signals = stop_on_signals  # only a command-line run owns the signals
        self.worker_id = new_worker_id()
        self.summary = RunSummary()
        self.loop: Loop | None = None
        self.stop_requested = threading.Event()

    def request_stop(self) -> None:
        """Let the running task finish, then stop; call it from another thread."""
        self.stop_requested.set()
        if self.loop is not None:
            self.loop.request_stop()

    def run(self) -> int:
        """Work until no job is ready (or the budget is spent, or a stop); return the code."""
        if self.loop is not None:  # run before: the registry takes an id once
            self.worker_id = new_worker_id()
        backend = worker_store(self.alias)
        tally = _Tally()
        hooks = [*(m() for m in DEFAULT_MIDDLEWARE), tally]
        # One slot: a job is claimed only when it runs, so nothing waits behind a long task.
        slots = Slots(multiprocessing.get_context(), 1)
        self.loop = loop = Loop(backend, self._config(), slots, hooks)
        if self.stop_requested.is_set():
            loop.request_stop()
        backend.register_worker(self._info(backend))
        keeper = None if _in_transaction() else LeaseKeeper(backend, self.worker_id, slots)
        scheduler = SchedulerThread(backend) if self.scheduler else None
        ended, counts = "crashed", True
        try:
            with _stopped_by_signals(loop, enabled=self.stop_on_signals):
                loop.run()
            ended, counts = "stopped", False
        except KeyboardInterrupt:
            ended, counts = "interrupted", False
            if not self.stop_on_signals:
                raise
            return EXIT_INTERRUPTED
        finally:
            if scheduler is not None:
                scheduler.stop()
            if keeper is not None:
                keeper.stop()
            self._put_back(backend, slots, ended, counts)
            self._end(backend, ended)
            self.summary = tally.summary()
        return EXIT_OK

    def _config(self) -> WorkerConfig:
        return WorkerConfig(
            worker_id=self.worker_id,
            queues=self.queues,
            threads=1,
            max_tasks=self.max_tasks,
            until_done=self.until_done,
        )

    def _info(self, backend: StoreBackend) -> WorkerInfo:
        return WorkerInfo(
            id=self.worker_id,
            backend=backend.alias,
            kind="process",
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues.describe(),
            threads=1,
            started_at=timezone.now(),
        )

    def _put_back(self, backend: StoreBackend, slots: Slots, ended: str, counts: bool) -> None:
        """Give back what the store still has leased to this worker, as for a dead child."""
        executing = frozenset((d.key, d.token) for d in slots.read() if d.executing)
        try:
            put_back = backend.release(
                self.worker_id,
                f"the in-process worker {ended}",
                executing=executing,
                counts_as_attempt=counts,
            )
        except Exception as e:
            logger.warning(
                "Could not put back the jobs of worker %s (%s: %s); they go back once their "
                "leases run out.",
                self.worker_id,
                type(e).__name__,
                e,
            )
            return
        for item in put_back:
            logger.warning(
                "Put back job %s (%s)%s: the in-process worker %s.",
                item.job.id,
                item.job.task_path,
                ", counted" if item.counted else "",
                ended,
            )

    def _end(self, backend: StoreBackend, ended: str) -> None:
        try:
            backend.end_worker(self.worker_id, ended)
        except Exception as e:
            logger.warning(
                "Could not mark worker %s stopped in the registry (%s).", self.worker_id, e
            )


class LeaseKeeper:
    """A daemon thread that renews an in-process worker's leases every third of a lease."""

    def __init__(self, backend: StoreBackend, worker_id: str, slots: Slots) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.slots = slots
        self.every = backend.conveyor_options.lease / 3
        self.failing = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="conveyor-leases", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=KEEPER_JOIN)

    def _run(self) -> None:
        next_beat = time.monotonic() + self.every
        try:
            while not self.stopped.wait(min(CANCEL_LOOK, self.every)):
                self.tell_cancels()
                if time.monotonic() >= next_beat:
                    self.beat()
                    next_beat = time.monotonic() + self.every
        finally:
            connections.close_all()  # this thread's own connections only

    def tell_cancels(self) -> None:
        """Tell the running task if its job was cancelled (``context.cancelled()``).

        In this process nobody stops a task that does not check: it runs to its end.
        """
        running = [(d.key, d.token) for d in self.slots.read() if d.executing]
        if not running:
            return
        try:
            asked = self.backend.cancels(running)
        except Exception:
            connections.close_all()
            return
        for key, token in asked:
            self.slots.ask_to_stop(key, token)

    def beat(self) -> None:
        """Renew the held delivery and the registry row; give back one never heard of."""
        try:
            self.backend.heartbeat([self.worker_id], held(self.slots))
            lost = self.backend.reclaim([self.worker_id])
        except Exception as e:
            connections.close_all()
            if not self.failing:
                logger.warning("Heartbeat of worker %s failed (%s); retrying.", self.worker_id, e)
            self.failing = True
            return
        if self.failing:
            logger.info("Worker %s reaches the store again; leases renewed.", self.worker_id)
        self.failing = False
        for job in lost:
            logger.warning(
                "Gave back job %s (%s): leased to worker %s, which never received it.",
                job.id,
                job.task_path,
                self.worker_id,
            )


def held(slots: Slots) -> list[Held]:
    """The deliveries in ``slots`` as the store's ``heartbeat`` takes them."""
    return [(d.key, d.token, clock.at(d.started) if d.executing else None) for d in slots.read()]


class _Tally(Middleware):
    """Count the outcomes the worker recorded."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def after_record(self, job: Job, task: Task, outcome: Outcome, recorded: bool) -> None:
        self.counts[outcome.disposition.value if recorded else "unrecorded"] += 1

    def summary(self) -> RunSummary:
        return RunSummary(
            succeeded=self.counts["succeeded"],
            failed=self.counts["failed"],
            retried=self.counts["retry"],
            snoozed=self.counts["snoozed"],
            unrecorded=self.counts["unrecorded"],
        )


def _in_transaction() -> bool:
    """Say whether this thread is inside ``atomic()`` on any database (a ``TestCase``)."""
    return any(conn.in_atomic_block for conn in connections.all(initialized_only=True))


@contextlib.contextmanager
def _stopped_by_signals(loop: Loop, *, enabled: bool) -> Iterator[None]:
    """First SIGINT or SIGTERM: finish the running task, then stop; a second: stop now.

    The handler only notes the signal (the wake-up pipe carries it to a thread that asks
    the loop to stop, which takes locks a handler must not); a second one raises
    ``KeyboardInterrupt`` in this thread.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt

    previous_fd = signal.set_wakeup_fd(write)
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    watcher = threading.Thread(
        target=_watch_signals, args=(read, loop), name="conveyor-signals", daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write)  # the watcher reads the end of the pipe and returns
        watcher.join(timeout=1.0)
        os.close(read)


def _watch_signals(read: int, loop: Loop) -> None:
    stopping = False
    while True:
        try:
            data = os.read(read, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        if not stopping:
            stopping = True
            logger.info(
                "Stopping once the running task finishes; send the signal again to stop now."
            )
            loop.request_stop()
