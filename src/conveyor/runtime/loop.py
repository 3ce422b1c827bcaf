"""One worker process's loop: claim, run (inline or on threads), record, wait.

Jobs are claimed ahead only as far as they will start soon: a process holds what its
threads run now plus what recent tasks say will finish within ``HORIZON``. When every
thread is busy with a task that has run past the horizon, the jobs still waiting behind it
are given back at once (uncounted, in their place), so another process takes them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from django.db import close_old_connections, connections
from django.utils import timezone

from conveyor import clock
from conveyor.backends.base import StoreBackend, Waiter
from conveyor.exceptions import TimeLimitExceeded
from conveyor.options import TimeLimits
from conveyor.records import Job, QueueSelector
from conveyor.runtime.channel import Slots
from conveyor.runtime.middleware import DEFAULT_MIDDLEWARE, Middleware, retry_delay
from conveyor.runtime.recorder import Recorder
from conveyor.runtime.runner import Finished, Runner

logger = logging.getLogger(__name__)

# Exit codes of a worker process, read by the supervisor.
EXIT_STOPPED = 0  # asked to stop, and did
EXIT_DONE = 3  # --until-done: nothing was left to do
EXIT_RECYCLE = 4  # --max-tasks-per-child reached: start a fresh process
EXIT_ORPHANED = 5  # the supervisor went away

HORIZON = 0.05  # claim ahead only what starts within this many seconds
MIN_POLL = 0.005  # first idle wait where nothing wakes workers; doubles to POLL_INTERVAL
IDLE_WAKEUP_WAIT = 5.0  # with wake-ups, the longest idle wait when nothing is due
STAGE_EVERY = 0.05  # how often a busy process makes due scheduled jobs ready
STORE_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # waits while the store cannot be reached
RECENT = 16  # durations remembered to judge how far to claim ahead
SUPERVISOR_WAIT = 0.1  # while the supervisor's heartbeat is late, look again this often
PAUSE_LOOK = 1.0  # seconds between looks at which queues are paused


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """How one worker process runs."""

    worker_id: str
    queues: QueueSelector
    threads: int = 1
    max_tasks: int | None = None
    max_memory: int | None = None  # bytes of memory (resident) past which it is replaced
    until_done: bool = False
    parent_pid: int | None = None


class Loop:
    """The claim -> run -> record loop of one process."""

    def __init__(
        self,
        backend: StoreBackend,
        config: WorkerConfig,
        slots: Slots | None = None,
        middleware: Sequence[Middleware] | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        size = config.threads + backend.conveyor_options.batch_size
        self.slots = slots or Slots(multiprocessing.get_context("fork"), size)
        hooks = list(middleware) if middleware is not None else [m() for m in DEFAULT_MIDDLEWARE]
        self.runner = Runner(backend, hooks)
        self.recorder = Recorder(backend, hooks, self._settled)
        self.cond = threading.Condition()
        self.waiting: deque[tuple[int, Job]] = deque()  # held, not started
        self.running: dict[int, float] = {}  # slot -> when its task started (monotonic)
        self.slot_of: dict[tuple[int, str], int] = {}
        self.results: queue.SimpleQueue[tuple[int, Finished]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.closed = False
        self.started = 0
        self.memory_looked, self.memory_over = -1, False
        self.pauses_looked, self.paused = -PAUSE_LOOK, frozenset[str]()
        self.pause_ends: list[datetime] = []  # when timed pauses end (store clock)
        self.pauses_failed = False
        self.came_up_empty = False  # the last claim found nothing: an idle process
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.waiter: Waiter = Waiter()
        self.wakeups = False
        self.emptied = False  # the last claim left nothing behind, and nothing woke us since
        self.next_stage = 0.0
        self.store_errors = 0
        self.idle_poll = MIN_POLL
        self.threads: list[threading.Thread] = []

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def request_stop(self) -> None:
        """Stop claiming; running tasks finish, claimed but unstarted jobs go back.

        Call it from a thread, never from a signal handler (it takes locks).
        """
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        self.waiter.interrupt()

    def run(self) -> int:
        """Work until told to stop (or done, or recycled); return the exit code."""
        self.waiter = self.backend.waiter(self.config.queues)
        self.wakeups = self.backend.supports_wakeup
        self._start_threads()
        try:
            code = self._loop()
            self._drain()
            return code
        finally:
            self._close()

    # --- the loop --------------------------------------------------------------------------

    def _loop(self) -> int:
        while not self.stopping.is_set():
            code = self._step()
            if code is not None:
                return code
        return EXIT_STOPPED

    def _step(self) -> int | None:
        """One turn of the loop; an exit code once the process should end."""
        self._collect()
        self._record(busy=self._busy())
        if self._orphaned():
            logger.warning("Supervisor went away; worker %s stops.", self.worker_id)
            return EXIT_ORPHANED
        if self._budget_spent() and not self._in_hand():
            return EXIT_RECYCLE
        if self.recorder.blocked:
            self._pause(self.recorder.due_in(busy=True))
            return None
        if not self.slots.supervisor_alive(self.backend.conveyor_options.lease * 2 / 3):
            # Nobody would renew what this process claims now: wait for the supervisor.
            self._pause(SUPERVISOR_WAIT, on_change=self._busy())
            return None
        jobs = self._claim() if self._wants_work() else []
        if jobs is None:
            self._pause(self._store_backoff())
            return None
        if jobs:
            self._hold(jobs)
            self.idle_poll = MIN_POLL
        return self._work_or_wait(claimed=bool(jobs))

    def _work_or_wait(self, claimed: bool) -> int | None:
        if self.config.threads == 1 and self.waiting:
            self._run_next_inline()
        elif self._in_hand():
            self._pause(self._busy_wait(), on_change=True)
        elif not claimed and self.config.until_done:
            return EXIT_DONE
        elif not claimed:
            self.idle_poll = self._idle(self.idle_poll)
        return None

    def _busy_wait(self) -> float:
        """How long to wait for a thread to finish before looking for work again."""
        wait = self.recorder.due_in(busy=True)
        if len(self.running) < self.config.threads:  # a thread is free: look again soon
            wait = min(wait, self.backend.conveyor_options.poll_interval)
        return wait

    def _busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _in_hand(self) -> bool:
        return self._busy() or self.results.qsize() > 0 or self.recorder.backlog > 0

    def _wants_work(self) -> bool:
        if self.emptied and not self.config.until_done and not self._in_hand():
            # About to wait: a job that came since the last claim has woken the waiter
            # already, so the wait returns at once and the claim follows. Looking now
            # would cost a round trip after every job, while its result is being read.
            return False
        return not self.waiting and not self._budget_spent() and self._room() > 0

    def _room(self) -> int:
        """How many jobs to claim now: free threads, plus those that will start soon."""
        free_threads = max(self.config.threads - len(self.running), 0)
        slowest = max(self.recent, default=HORIZON)
        ahead = int(HORIZON / max(slowest, 1e-4)) if slowest < HORIZON else 0
        room = min(free_threads + ahead, self.slots.free, self.backend.conveyor_options.batch_size)
        if self.config.max_tasks is not None:
            room = min(room, self.config.max_tasks - self.started - len(self.waiting))
        return max(room, 0)

    def _budget_spent(self) -> bool:
        if self.config.max_tasks is not None and self.started >= self.config.max_tasks:
            return True
        return self._over_memory()

    def _over_memory(self) -> bool:
        """Say whether the process outgrew ``max_memory`` (looked at once per task started).

        Never before its first task: a limit below what a fresh process holds still lets
        each process run one.
        """
        if self.config.max_memory is None or self.started == 0:
            return False
        if self.memory_looked != self.started:
            self.memory_looked = self.started
            used = resident_memory()
            if used is not None and used > self.config.max_memory and not self.memory_over:
                logger.info(
                    "Worker %s uses %d MiB, over its limit of %d MiB: it is replaced once its "
                    "running tasks end.",
                    self.worker_id,
                    used // 2**20,
                    self.config.max_memory // 2**20,
                )
                self.memory_over = True
        return self.memory_over

    def _orphaned(self) -> bool:
        return self.config.parent_pid is not None and os.getppid() != self.config.parent_pid

    # --- claiming and waiting ------------------------------------------------------------------

    def _serving(self) -> QueueSelector:
        """The queues to claim from now: the process's own, less those paused.

        The pauses are looked at about once a second, and at every claim of an idle
        process while some queue is paused (it was woken: that queue may have been resumed).
        """
        now = time.monotonic()
        # Idle with queues paused, it looks at every claim: it was woken, maybe by a resume.
        if now >= self.pauses_looked + PAUSE_LOOK or (self.came_up_empty and self.paused):
            self.pauses_looked = now
            try:
                found = self.backend.paused_queues()
                self.paused = frozenset(found)
                self.pause_ends = [
                    clock.aware(end)
                    for name, end in found.items()
                    if end is not None and self.config.queues.allows(name)
                ]
            except Exception as e:  # a store without the table yet (no migrate): no pauses
                if not self.pauses_failed:
                    logger.warning(
                        "Cannot read which queues are paused: %s: %s", type(e).__name__, e
                    )
                self.pauses_failed, self.paused, self.pause_ends = True, frozenset(), []
            else:
                self.pauses_failed = False
        if not self.paused:
            return self.config.queues
        return replace(self.config.queues, exclude=self.config.queues.exclude | self.paused)

    def _claim(self) -> list[Job] | None:
        """Claim what there is room for; None if the store could not be reached."""
        serving = self._serving()
        self.emptied = False
        try:
            self._stage()
            room = self._room()
            jobs = self.backend.claim(self.worker_id, serving, room)
        except Exception as e:
            self._store_failed("claim jobs", e)
            return None
        self._store_ok()
        self.emptied = self.wakeups and len(jobs) < room
        self.came_up_empty = not jobs
        return jobs

    def _stage(self, force: bool = False) -> None:
        """Make scheduled jobs that fell due ready, at most every ``STAGE_EVERY`` seconds."""
        now = time.monotonic()
        if force or now >= self.next_stage:
            self.next_stage = now + STAGE_EVERY
            self.backend.stage()

    def _hold(self, jobs: list[Job]) -> None:
        with self.cond:
            for job in jobs:
                index = self.slots.hold(job)
                self.slot_of[(job.key, job.delivery)] = index
                self.waiting.append((index, job))
            self.cond.notify_all()

    def _idle(self, poll: float) -> float:
        """Wait for work; return the next poll interval where nothing wakes workers."""
        longest = self.backend.conveyor_options.poll_interval
        if not self.wakeups:
            self._wait_for_work(poll)
            return min(poll * 2, longest)
        # Woken workers need no ladder: a wake that finds nothing waits long again.
        woke = self._wait_for_work(self._until_due())
        self.emptied = False
        if woke:
            # New ready work: claim it first. Nothing was due when the wait began (it
            # would have been staged), so staging can wait its usual turn.
            self.next_stage = max(self.next_stage, time.monotonic() + STAGE_EVERY)
        else:
            self.next_stage = 0.0  # a due time may have come
        return poll

    def _until_due(self) -> float:
        """How long an idle worker may wait: until a job falls due or a timed pause ends."""
        return min(self._until_job_due(), self._until_pause_ends())

    def _until_pause_ends(self) -> float:
        """Until the first timed pause of a queue served here ends (nothing wakes workers
        then); a pause that seems over by this machine's clock is looked at every poll."""
        if not self.pause_ends:
            return IDLE_WAKEUP_WAIT
        left = (min(self.pause_ends) - clock.aware(clock.now())).total_seconds()
        return left if left > 0 else self.backend.conveyor_options.poll_interval

    def _until_job_due(self) -> float:
        try:
            due = self.backend.next_due(self.config.queues)
        except Exception as e:
            self._store_failed("read the next due time", e)
            return self._store_backoff()
        if due is None:
            return IDLE_WAKEUP_WAIT
        left = (due - timezone.now()).total_seconds()
        if left > MIN_POLL:
            return min(left, IDLE_WAKEUP_WAIT)
        # Due by this machine's clock; the store's clock decides, which may run behind.
        try:
            staged = self.backend.stage()
        except Exception as e:
            self._store_failed("make due jobs ready", e)
            return self._store_backoff()
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
            self.waiter = Waiter()
            self.wakeups = False
            self.waiter.wait(min(timeout, self.backend.conveyor_options.poll_interval))
            return False

    def _pause(self, timeout: float, on_change: bool = False) -> None:
        """Wait up to ``timeout``; with ``on_change``, until a thread finishes a job."""
        timeout = max(timeout, 0.0)
        if on_change and self.config.threads > 1:
            with contextlib.suppress(queue.Empty):
                self._add_result(self.results.get(timeout=timeout))
        else:
            self.stopping.wait(timeout)

    # --- store trouble ---------------------------------------------------------------------

    def _store_failed(self, what: str, error: Exception) -> None:
        close_old_connections()
        self.store_errors += 1
        log = logger.warning if self.store_errors == 1 else logger.debug
        log(
            "Worker %s could not %s (%s: %s); retrying.",
            self.worker_id,
            what,
            type(error).__name__,
            error,
        )

    def _store_ok(self) -> None:
        if self.store_errors:
            logger.info("Worker %s reaches the store again.", self.worker_id)
        self.store_errors = 0

    def _store_backoff(self) -> float:
        return STORE_BACKOFF[min(self.store_errors, len(STORE_BACKOFF)) - 1]

    # --- running -----------------------------------------------------------------------------

    def _run_next_inline(self) -> None:
        with self.cond:
            if not self.waiting:
                return
            index, job = self.waiting.popleft()
            if not self._begin(index, job):
                return
        self._run(index, job, self._add_result)

    def _begin(self, index: int, job: Job) -> bool:
        """Under ``cond``: the job in ``index`` starts now; False if it was taken back."""
        limit = TimeLimits.from_stored(job.options).hard
        on_limit = retry_delay(job, TimeLimitExceeded()) if limit else None
        started = self.slots.start(
            index,
            limit,
            -1.0 if on_limit is None else on_limit,
            bool(job.options.get("sigkill_on_stop")),
        )
        if not started:  # the supervisor gave it back meanwhile
            self.slot_of.pop((job.key, job.delivery), None)
            self.slots.release(index)
            return False
        self.started += 1
        self.running[index] = time.monotonic()
        self.cond.notify_all()
        return True

    def _run(self, index: int, job: Job, deliver: Callable[[tuple[int, Finished]], None]) -> None:
        """Run ``job`` and hand its result on; it is never out of sight in between."""
        finished = self.runner.run_one(job, lambda: self.slots.cancel_asked(index))
        self.slots.finish(index, finished.outcome)  # a crash now would not count it
        with self.cond:
            began = self.running.pop(index, time.monotonic())
            self.recent.append(time.monotonic() - began)
            deliver((index, finished))
            self.cond.notify_all()

    def _add_result(self, item: tuple[int, Finished]) -> None:
        self.recorder.add(item[1])

    def _collect(self) -> None:
        while True:
            try:
                self._add_result(self.results.get_nowait())
            except queue.Empty:
                return

    def _record(self, busy: bool) -> None:
        if self.recorder.backlog and self.recorder.due_in(busy) <= 0:
            self.recorder.flush()

    def _settled(self, item: Finished) -> None:
        """The recorder is done with a delivery: free its slot (and look at the memory)."""
        self.memory_looked = -1  # a task ended: it may have grown the process
        index = self.slot_of.pop((item.job.key, item.job.delivery), None)
        if index is not None:
            self.slots.release(index)

    # --- threads -------------------------------------------------------------------------------

    def _start_threads(self) -> None:
        targets = [self._watch]
        if self.config.threads > 1:
            targets += [self._serve] * self.config.threads
        for n, target in enumerate(targets):
            thread = threading.Thread(target=target, name=f"conveyor-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self) -> None:
        """A task thread: run waiting jobs until the loop closes."""
        try:
            while True:
                with self.cond:
                    while not self.waiting and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    index, job = self.waiting.popleft()
                    if not self._begin(index, job):
                        continue
                self._run(index, job, self.results.put)
        finally:
            connections.close_all()

    def _watch(self) -> None:
        """While every thread is stuck past the horizon, let nothing wait behind them.

        Jobs claimed ahead go back (uncounted, in their place) for other processes, and
        outcomes waiting for a batch are saved now.
        """
        try:
            while True:
                with self.cond:
                    while not self._overrun() and not self.closed:
                        self.cond.wait(self._next_look())
                    if self.closed:
                        return
                    stray = list(self.waiting)
                    self.waiting.clear()
                self._give_back(stray, "a task ahead of it ran long")
                if self.recorder.backlog and not self.recorder.blocked:
                    self.recorder.flush()
        finally:
            connections.close_all()

    def _held_back(self) -> bool:
        """Under ``cond``: say whether jobs or outcomes wait while every thread is busy."""
        waiting = self.waiting or (self.recorder.backlog and not self.recorder.blocked)
        return bool(waiting) and len(self.running) >= self.config.threads

    def _next_look(self) -> float | None:
        if not self._held_back():
            return None
        return max(max(self.running.values()) + HORIZON - time.monotonic(), 0.001)

    def _overrun(self) -> bool:
        """Under ``cond``: say whether every thread is past the horizon, holding work back."""
        return self._held_back() and time.monotonic() - max(self.running.values()) >= HORIZON

    def _give_back(self, items: list[tuple[int, Job]], why: str) -> None:
        if not items:
            return
        try:
            self.backend.unclaim([job for _, job in items])
        except Exception as e:
            close_old_connections()
            logger.warning(
                "Worker %s could not give back %d job(s) (%s); they go back once their "
                "leases lapse: %s",
                self.worker_id,
                len(items),
                e,
                ", ".join(f"{job.id} ({job.task_path})" for _, job in items[:5]),
            )
        else:
            logger.debug("Worker %s gave back %d job(s): %s.", self.worker_id, len(items), why)
        for index, job in items:
            self.slot_of.pop((job.key, job.delivery), None)
            self.slots.release(index)

    # --- stopping ------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Give back jobs not started yet; let running ones finish and record them."""
        with self.cond:
            stray = list(self.waiting)
            self.waiting.clear()
        self._give_back(stray, "the worker is stopping")
        while self.running or self.results.qsize() or self.recorder.backlog:
            self._collect()
            if self.recorder.backlog and self.recorder.due_in(busy=False) <= 0:
                self.recorder.flush()
            if self.recorder.failures > len(STORE_BACKOFF) and not self.running:
                break  # the store stayed unreachable: give up (the jobs go back)
            if self.running or self.recorder.backlog:
                self._pause(min(self.recorder.due_in(busy=False), 0.5), on_change=True)

    def _close(self) -> None:
        self.stopping.set()
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(timeout=5)
        self._collect()
        if self.recorder.backlog and not self.recorder.blocked:
            self.recorder.flush()  # a last try for what finished while stopping
        self.recorder.give_up_all()
        self.waiter.close()
        self.backend.close()


def resident_memory() -> int | None:
    """Bytes of memory this process has resident now (Linux); None where that is unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
