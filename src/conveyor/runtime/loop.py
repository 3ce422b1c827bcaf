"""One worker process's loop: claim, run (inline or on threads), record, wait.

Each turn collects what the task threads finished, saves outcomes that are due, and claims
as many jobs as will start soon (``threads.py``), from the queues served less those paused
(``pauses.py``); with nothing in hand it waits for work (``waiting.py``). A process ends when
asked to stop, when its supervisor goes away, when ``--until-done`` finds nothing left, or
once it ran ``max_tasks`` tasks or outgrew ``max_memory``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.backends.base import StoreBackend
from conveyor.records import Job, QueueSelector
from conveyor.runtime.channel import Slots
from conveyor.runtime.middleware import DEFAULT_MIDDLEWARE, Middleware
from conveyor.runtime.pauses import Pauses
from conveyor.runtime.recorder import Recorder
from conveyor.runtime.runner import Finished, Runner
from conveyor.runtime.threads import TaskThreads
from conveyor.runtime.waiting import STORE_BACKOFF, Idle, StoreTrouble

logger = logging.getLogger(__name__)

# Exit codes of a worker process, read by the supervisor.
EXIT_STOPPED = 0  # asked to stop, and did
EXIT_DONE = 3  # --until-done: nothing was left to do
EXIT_RECYCLE = 4  # --max-tasks-per-child reached: start a fresh process
EXIT_ORPHANED = 5  # the supervisor went away

SUPERVISOR_WAIT = 0.1  # while the supervisor's heartbeat is late, look again this often
SIBLING_WAIT = 0.002  # an idle process waits this long at most for a sibling's claim to end


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
    place: str = ""  # the name of its place in the worker: its metrics' sample files


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
        runner = Runner(backend, hooks)
        self.recorder = Recorder(backend, hooks, self._settled)
        self.threads = TaskThreads(
            backend, config.worker_id, config.threads, self.slots, runner, self.recorder
        )
        self.stopping = threading.Event()
        self.memory_looked, self.memory_over = -1, False
        self.came_up_empty = False  # the last claim found nothing: an idle process
        self.pauses = Pauses(backend, config.queues)
        self.trouble = StoreTrouble(config.worker_id)
        self.idle = Idle(backend, config.worker_id, config.queues, self.pauses, self.trouble)
        self.pid = os.getpid()

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def request_stop(self) -> None:
        """Stop claiming; running tasks finish, claimed but unstarted jobs go back.

        Call it from a thread, never from a signal handler (it takes locks).
        """
        self.stopping.set()
        self.threads.wake()
        self.idle.interrupt()

    def run(self) -> int:
        """Work until told to stop (or done, or recycled); return the exit code."""
        self.idle.open()
        self.threads.start()
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
        self.threads.collect()
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
        wants = self._wants_work()
        if wants and self._behind_sibling():
            self.idle.wait_briefly(SIBLING_WAIT)
            return None
        jobs = self._claim() if wants else []
        if jobs is None:
            self._pause(self.trouble.backoff())
            return None
        if jobs:
            self._hold(jobs)
        return self._work_or_wait(claimed=bool(jobs))

    def _work_or_wait(self, claimed: bool) -> int | None:
        if self.config.threads == 1 and self.threads.waiting:
            self.threads.run_next_inline()
        elif self._in_hand():
            self._pause(self._busy_wait(), on_change=True)
        elif not claimed and self.config.until_done:
            return EXIT_DONE
        elif not claimed:
            self.idle.wait()
        return None

    def _busy_wait(self) -> float:
        """How long to wait for a thread to finish before looking for work again."""
        wait = self.recorder.due_in(busy=True)
        if len(self.threads.running) < self.config.threads:  # a thread is free: look again soon
            wait = min(wait, self.backend.conveyor_options.poll_interval)
        return wait

    def _busy(self) -> bool:
        return bool(self.threads.waiting or self.threads.running)

    def _in_hand(self) -> bool:
        return self._busy() or self.threads.results.qsize() > 0 or self.recorder.backlog > 0

    def _wants_work(self) -> bool:
        if self.idle.emptied and not self.config.until_done and not self._in_hand():
            # About to wait: a job that came since the last claim has woken the waiter
            # already, so the wait returns at once and the claim follows. Looking now
            # would cost a round trip after every job, while its result is being read.
            return False
        return not self.threads.waiting and not self._budget_spent() and self._room() > 0

    def _room(self) -> int:
        """How many jobs to claim now: free threads, plus those that will start soon."""
        room = min(self.threads.room(), self.backend.conveyor_options.batch_size)
        if self.config.max_tasks is not None:
            held = self.threads.started + len(self.threads.waiting)
            room = min(room, self.config.max_tasks - held)
        return max(room, 0)

    def _behind_sibling(self) -> bool:
        """Say whether this process, just woken from an idle wait, should let a sibling's
        claim end before its own (see ``channel.Claiming``). Once per wake-up: a process
        with work in hand, or between two jobs, or that waited once already, claims."""
        claiming = self.slots.claiming
        if claiming is None or not self.idle.woke or self._in_hand():
            return False
        return claiming.by_sibling(self.pid)

    def _budget_spent(self) -> bool:
        if self.config.max_tasks is not None and self.threads.started >= self.config.max_tasks:
            return True
        return self._over_memory()

    def _over_memory(self) -> bool:
        """Say whether the process outgrew ``max_memory`` (looked at once per task started).

        Never before its first task: a limit below what a fresh process holds still lets
        each process run one.
        """
        if self.config.max_memory is None or self.threads.started == 0:
            return False
        if self.memory_looked != self.threads.started:
            self.memory_looked = self.threads.started
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

    # --- claiming, holding and recording ---------------------------------------------------

    def _claim(self) -> list[Job] | None:
        """Claim what there is room for; None if the store could not be reached."""
        # An idle process (its last claim found nothing, or it waited since) looks at the
        # pauses afresh while some are on: what woke it may be a queue's resume.
        serving = self.pauses.serving(idle=self.came_up_empty or self.idle.waited)
        self.idle.waited = False
        try:
            self.idle.claiming()
            room = self._room()
            jobs = self._claim_marked(serving, room)
        except Exception as e:
            self.trouble.failed("claim jobs", e)
            return None
        self.trouble.ok()
        self.idle.claimed(len(jobs), room)
        self.came_up_empty = not jobs
        return jobs

    def _claim_marked(self, serving: QueueSelector, room: int) -> list[Job]:
        claiming = self.slots.claiming
        if claiming is None:
            return self.backend.claim(self.worker_id, serving, room)
        claiming.begin(self.pid)
        try:
            return self.backend.claim(self.worker_id, serving, room)
        finally:
            claiming.end(self.pid)

    def _hold(self, jobs: list[Job]) -> None:
        self.threads.hold(jobs)

    def _pause(self, timeout: float, on_change: bool = False) -> None:
        """Wait up to ``timeout``; with ``on_change``, until a thread finishes a job."""
        timeout = max(timeout, 0.0)
        if on_change and self.config.threads > 1:
            self.threads.wait_for_result(timeout)
        else:
            self.stopping.wait(timeout)

    def _record(self, busy: bool) -> None:
        if self.recorder.backlog and self.recorder.due_in(busy) <= 0:
            self.recorder.flush()

    def _settled(self, item: Finished) -> None:
        """The recorder is done with a delivery: free its slot (and look at the memory)."""
        self.memory_looked = -1  # a task ended: it may have grown the process
        self.threads.release(item.job)

    # --- stopping ------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Give back jobs not started yet; let running ones finish and record them."""
        self.threads.give_back_waiting("the worker is stopping")
        while self.threads.running or self.threads.results.qsize() or self.recorder.backlog:
            self.threads.collect()
            if self.recorder.backlog and self.recorder.due_in(busy=False) <= 0:
                self.recorder.flush()
            if self.recorder.failures > len(STORE_BACKOFF) and not self.threads.running:
                break  # the store stayed unreachable: give up (the jobs go back)
            if self.threads.running or self.recorder.backlog:
                self._pause(min(self.recorder.due_in(busy=False), 0.5), on_change=True)

    def _close(self) -> None:
        self.stopping.set()
        self.threads.close()
        self.threads.collect()
        if self.recorder.backlog and not self.recorder.blocked:
            self.recorder.flush()  # a last try for what finished while stopping
        self.recorder.give_up_all()
        self.idle.close()
        self.backend.close()


def resident_memory() -> int | None:
    """Bytes of memory this process has resident now (Linux); None where that is unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
