"""The jobs one worker process holds, and the threads that run them.

Each job claimed is held in a slot (``channel.py``) and waits its turn; a task thread (or,
with one thread, the loop itself) starts it, runs it and hands its outcome to the recorder,
whose settling frees the slot. Jobs are claimed ahead only as far as they will start soon:
a process holds what its threads run now plus what recent tasks say will finish within
``HORIZON``. When every thread is busy with a task that has run past the horizon, a watcher
thread gives the jobs still waiting behind it back at once (uncounted, in their place), so
another process takes them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from django.db import close_old_connections, connections

from conveyor.backends.base import StoreBackend
from conveyor.exceptions import TimeLimitExceeded
from conveyor.options import TimeLimits
from conveyor.records import Job
from conveyor.runtime.channel import Slots
from conveyor.runtime.middleware import retry_delay
from conveyor.runtime.recorder import Recorder
from conveyor.runtime.runner import Finished, Runner

logger = logging.getLogger(__name__)

HORIZON = 0.05  # claim ahead only what starts within this many seconds
RECENT = 16  # durations remembered to judge how far to claim ahead


class TaskThreads:
    """Hold claimed jobs in slots and run them, on ``size`` threads or inline with one."""

    def __init__(
        self,
        backend: StoreBackend,
        worker_id: str,
        size: int,
        slots: Slots,
        runner: Runner,
        recorder: Recorder,
    ) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.size = size
        self.slots = slots
        self.runner = runner
        self.recorder = recorder
        lock = threading.RLock()
        self.cond = threading.Condition(lock)  # task threads wait on it for jobs to run
        self.watching = threading.Condition(lock)  # the watcher waits on it
        self.waiting: deque[tuple[int, Job]] = deque()  # held, not started
        self.running: dict[int, float] = {}  # slot -> when its task started (monotonic)
        self.slot_of: dict[tuple[int, str], int] = {}
        self.results: queue.SimpleQueue[tuple[int, Finished]] = queue.SimpleQueue()
        self.closed = False
        self.started = 0
        self.recent: deque[float] = deque(maxlen=RECENT)
        self._threads: list[threading.Thread] = []

    def room(self) -> int:
        """How many more jobs to hold now: free threads, plus those that will start soon."""
        free_threads = max(self.size - len(self.running), 0)
        slowest = max(self.recent, default=HORIZON)
        ahead = int(HORIZON / max(slowest, 1e-4)) if slowest < HORIZON else 0
        return min(free_threads + ahead, self.slots.free)

    def hold(self, jobs: list[Job]) -> None:
        """Hold claimed ``jobs``, each in a slot of its own, until a thread starts it."""
        with self.cond:
            for job in jobs:
                index = self.slots.hold(job)
                self.slot_of[(job.key, job.delivery)] = index
                self.waiting.append((index, job))
            self.cond.notify_all()
            self._rouse_watcher()

    def release(self, job: Job) -> None:
        """Free the slot of ``job``'s delivery, once its outcome is settled."""
        index = self.slot_of.pop((job.key, job.delivery), None)
        if index is not None:
            self.slots.release(index)

    def wake(self) -> None:
        """Have every thread look again at what it waits for."""
        with self.cond:
            self.cond.notify_all()
            self.watching.notify_all()

    # --- running -----------------------------------------------------------------------------

    def run_next_inline(self) -> None:
        """Run the next waiting job in the calling thread."""
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
        self._rouse_watcher()
        return True

    def _run(self, index: int, job: Job, deliver: Callable[[tuple[int, Finished]], None]) -> None:
        """Run ``job`` and hand its result on; it is never out of sight in between."""
        finished = self.runner.run_one(job, lambda: self.slots.cancel_asked(index))
        self.slots.finish(index, finished.outcome)  # a crash now would not count it
        with self.cond:
            began = self.running.pop(index, time.monotonic())
            self.recent.append(time.monotonic() - began)
            deliver((index, finished))

    def _add_result(self, item: tuple[int, Finished]) -> None:
        self.recorder.add(item[1])

    def collect(self) -> None:
        """Hand the recorder every outcome the task threads have delivered."""
        while True:
            try:
                self._add_result(self.results.get_nowait())
            except queue.Empty:
                return

    def wait_for_result(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a task thread to deliver an outcome; record it."""
        with contextlib.suppress(queue.Empty):
            self._add_result(self.results.get(timeout=timeout))

    # --- threads -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher, and the task threads if there is more than one."""
        targets = [self._watch]
        if self.size > 1:
            targets += [self._serve] * self.size
        for n, target in enumerate(targets):
            thread = threading.Thread(target=target, name=f"conveyor-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """End the threads (a running task finishes first, up to a few seconds)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            self.watching.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

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
                        self.watching.wait(self._next_look())
                    if self.closed:
                        return
                    stray = list(self.waiting)
                    self.waiting.clear()
                self._give_back(stray, "a task ahead of it ran long")
                if self.recorder.backlog and not self.recorder.blocked:
                    self.recorder.flush()
        finally:
            connections.close_all()

    def _rouse_watcher(self) -> None:
        """Under ``cond``: wake the watcher if work is now held back behind busy threads.

        Only then can its answer change; waking it at every start and end of a task would
        cost each job a switch between threads.
        """
        if self._held_back():
            self.watching.notify()

    def _held_back(self) -> bool:
        """Under ``cond``: say whether jobs or outcomes wait while every thread is busy."""
        waiting = self.waiting or (self.recorder.backlog and not self.recorder.blocked)
        return bool(waiting) and len(self.running) >= self.size

    def _next_look(self) -> float | None:
        if not self._held_back():
            return None
        return max(max(self.running.values()) + HORIZON - time.monotonic(), 0.001)

    def _overrun(self) -> bool:
        """Under ``cond``: say whether every thread is past the horizon, holding work back."""
        return self._held_back() and time.monotonic() - max(self.running.values()) >= HORIZON

    # --- giving back ---------------------------------------------------------------------------

    def give_back_waiting(self, why: str) -> None:
        """Give back every job not started yet (uncounted, in its place)."""
        with self.cond:
            stray = list(self.waiting)
            self.waiting.clear()
        self._give_back(stray, why)

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
