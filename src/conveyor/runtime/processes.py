"""A supervisor's worker processes: starting them, reaping them, starting others after.

Each process is forked with its slots (``channel.py``) and the stop signals blocked across
the fork. When one ends, what it held is put back (counted only if it crashed) and its
registry row ended; another takes its place at once, unless the supervisor is stopping or
the process ran out of work under ``--until-done``. One that dies before it was ready is
replaced after a growing delay, so a worker that cannot start does not spin.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from conveyor.backends.base import StoreBackend
from conveyor.runtime import exporter
from conveyor.runtime.channel import Claiming, Slots
from conveyor.runtime.child import STOP_SIGNALS, child_main
from conveyor.runtime.leases import Leases
from conveyor.runtime.loop import EXIT_DONE, EXIT_RECYCLE, EXIT_STOPPED, WorkerConfig
from conveyor.runtime.registry import Registry

if TYPE_CHECKING:
    from conveyor.runtime.supervisor import WorkerSettings

logger = logging.getLogger(__name__)

FORK_LATER = 0.5  # seconds after which a fork put off (a scrape was reading) is tried again

MAX_RESPAWN_DELAY = 10.0
KILL_WAIT = 5.0  # longest wait for a SIGKILLed child (one stuck in the kernel) to go


@dataclass(slots=True)
class Child:
    """One running worker process, the id its jobs are leased under, and its slots."""

    process: BaseProcess
    worker_id: str
    slots: Slots
    pool: int = 0
    started: float = field(default_factory=time.monotonic)
    place: int = 0  # its place among the running processes: taken over by its replacement


class Processes:
    """Keep a supervisor's worker processes running, each pool with its own queues."""

    def __init__(
        self,
        backend: StoreBackend,
        settings: WorkerSettings,
        host: str,
        leases: Leases,
        registry: Registry,
        wake: int,
        stopping: Callable[[], bool],
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.host = host
        self.leases = leases
        self.registry = registry
        self.wake = wake  # the pipe a child's slots write to when the supervisor should look
        self.stopping = stopping  # whether a stop was asked for: nothing is replaced then
        self.context = multiprocessing.get_context("fork")
        self.claiming: dict[int, Claiming] = {}  # per pool, shared by its processes
        self.children: list[Child] = []
        self.spawned = 0
        self.respawn_at: list[tuple[float, int]] = []  # when, and into which pool
        self.crash_streak = 0
        self.stop_killed: set[int] = set()  # children stopped at once for sigkill_on_stop
        self.put_off_until = 0.0  # forks wait for no scrape before then

    def spawn(self, pool: int = 0) -> Child | None:
        """Start a worker process on the queues of ``pool`` (a little later if it cannot be
        forked now); the process, unregistered yet (``register``)."""
        now = time.monotonic()
        if now < self.put_off_until:  # a scrape was reading a moment ago: no wait again
            self.respawn_at.append((self.put_off_until, pool))
            return None
        with exporter.forking() as free:
            if free:
                return self._start(pool)
            self.put_off_until = now + FORK_LATER
            self.respawn_at.append((self.put_off_until, pool))
            return None

    def register(self, started: list[Child]) -> None:
        """Note processes just started in the workers table (shown by ``conveyor status``).

        Done after a turn's forks, not between them: each fork closes the supervisor's
        connections, and a write between two forks would open them again.
        """
        for child in started:
            with contextlib.suppress(Exception):
                queues = self.settings.all_pools[child.pool].queues
                self.registry.register(child.worker_id, "process", child.process.pid or 0, queues)

    def _start(self, pool: int) -> Child:
        self.spawned += 1
        worker_id = f"{self.host}:{self.spawned}"
        taken = {child.place for child in self.children}
        place = next(n for n in range(1, len(taken) + 2) if n not in taken)
        config = self._config(worker_id, pool, place)
        size = self.settings.threads + self.backend.conveyor_options.batch_size
        slots = Slots(self.context, size, wake=self.wake, claiming=self._claiming(pool))
        self.backend.before_fork()
        process = self.context.Process(
            target=child_main,
            args=(self.backend.alias, config, slots),
            name=f"conveyor-{worker_id}",
            daemon=False,
        )
        # Blocked only across the fork: the child installs its own handlers, then unblocks.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        slots.stamp()
        child = Child(process=process, worker_id=worker_id, slots=slots, pool=pool, place=place)
        self.children.append(child)
        logger.info("Started worker process %s (%s)", process.pid, worker_id)
        return child

    def _claiming(self, pool: int) -> Claiming | None:
        """The claim mark of ``pool``'s processes, where claims queue up for one lock."""
        if not self.backend.claims_queue_up:
            return None
        if pool not in self.claiming:
            self.claiming[pool] = Claiming(self.context)
        return self.claiming[pool]

    def _config(self, worker_id: str, pool: int, place: int) -> WorkerConfig:
        return WorkerConfig(
            worker_id=worker_id,
            queues=self.settings.all_pools[pool].queues,
            threads=self.settings.threads,
            max_tasks=self.settings.max_tasks_per_child,
            max_memory=self.settings.max_memory,
            until_done=self.settings.until_done,
            parent_pid=os.getpid(),
            place=f"process-{place}",
        )

    def reap(self) -> None:
        """Put back what each process that ended held, and start others in their place."""
        for child in [c for c in self.children if not c.process.is_alive()]:
            child.process.join()
            self.children.remove(child)
            code = child.process.exitcode
            crashed = code not in (EXIT_DONE, EXIT_RECYCLE, EXIT_STOPPED)
            how = describe_exit(code)
            if child.process.pid in self.stop_killed:
                crashed, how = False, "was stopped at once: it ran a task with sigkill_on_stop"
            self.leases.release(child, f"worker process {child.process.pid} {how}", counts=crashed)
            self.registry.end(child.worker_id, how)
            if self.stopping() or code == EXIT_DONE:
                continue
            delay = self._respawn_delay(child, crashed, how)
            self.respawn_at.append((time.monotonic() + delay, child.pool))

    def signal_kill(self, pid: int) -> None:
        """Send SIGKILL to process ``pid`` (gone already: nothing to do)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def kill(self, child: Child, pid: int) -> None:
        """Kill ``child`` (its process ``pid``) at once and wait for it to go."""
        self.signal_kill(pid)
        child.process.join(timeout=KILL_WAIT)
        self.children.remove(child)

    def start_soon(self, pool: int, count: int) -> None:
        """Have ``count`` processes started in ``pool`` by the next turns of the loop, each
        start leaving room to stop a task past its limit first."""
        self.respawn_at.extend([(time.monotonic(), pool)] * count)

    def replace(self, child: Child) -> None:
        """Start another process in the pool of ``child`` at once, unless stopping."""
        if not self.stopping():
            self.respawn_at.append((time.monotonic(), child.pool))

    def _respawn_delay(self, child: Child, crashed: bool, how: str) -> float:
        """No delay for a child that was working; backoff for one that never got ready."""
        if not crashed:
            return 0.0
        if child.slots.is_ready:
            self.crash_streak = 0
            logger.error("Worker process %s %s; starting another.", child.process.pid, how)
            return 0.0
        self.crash_streak += 1
        delay = min(0.1 * 2**self.crash_streak, MAX_RESPAWN_DELAY)
        logger.error(
            "Worker process %s %s before it was ready; starting another in %.1fs.",
            child.process.pid,
            how,
            delay,
        )
        return delay

    def respawn_due(self, until: Callable[[], bool] | None = None) -> None:
        """Start the processes whose time has come (none once stopping).

        ``until``: asked after each start; True leaves the rest for the next turn (a fork
        takes milliseconds, and a time limit falling due meanwhile comes first).
        """
        if self.stopping():
            self.respawn_at.clear()
            return
        now, started = time.monotonic(), []
        for due in [due for due in self.respawn_at if due[0] <= now]:
            self.respawn_at.remove(due)
            child = self.spawn(due[1])
            if child is not None:
                started.append(child)
            if until is not None and until():
                break
        self.register(started)

    # --- stopping --------------------------------------------------------------------------

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every process."""
        for child in self.children:
            if child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signum)

    def kill_those_stopping_at_once(self) -> None:
        """Kill each process running a task that asked not to be waited for at a stop."""
        for child in self.children:
            pid = child.process.pid
            if pid and pid not in self.stop_killed and child.slots.stops_at_once():
                self.stop_killed.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """Kill every process now; their jobs go back, uncounted."""
        self.signal_all(signal.SIGKILL)
        for child in self.children:
            child.process.join()
            self.leases.release(
                child, "the worker was stopped before the task finished", counts=False
            )
            self.registry.end(child.worker_id, "killed by a forced stop")
        self.children.clear()


def describe_exit(code: int | None) -> str:
    """How a process with exit code ``code`` ended, for logs and the registry."""
    if code is not None and code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"
