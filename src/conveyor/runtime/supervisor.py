"""The parent process: starts worker processes, watches them, renews their leases.

It reads each child's slots (``channel.py``) to renew exactly the deliveries the child
holds, and, when a child dies, to count only what it was executing. It is the only process
that acts on signals: the first SIGTERM, SIGINT or SIGHUP stops gracefully, a second one
(or the grace period) stops at once. It also deletes, a batch at a time, the finished jobs
kept past their retention (``retention.py``), and fires due schedules (``scheduler.py``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

from django.db import connections
from django.utils import timezone

from conveyor.backends.base import StoreBackend, worker_store
from conveyor.exceptions import NotMigrated
from conveyor.records import Pool, QueueSelector, WorkerInfo, new_worker_id
from conveyor.runtime.announcer import announce_main
from conveyor.runtime.channel import Slots
from conveyor.runtime.child import STOP_SIGNALS, child_main
from conveyor.runtime.leases import Leases, cancel_outcome, limit_outcome
from conveyor.runtime.loop import EXIT_DONE, EXIT_RECYCLE, EXIT_STOPPED, WorkerConfig
from conveyor.runtime.progress import Progress
from conveyor.runtime.retention import Expiry
from conveyor.runtime.scheduler import Scheduler

if TYPE_CHECKING:
    from conveyor.metrics import Exporter

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1  # a forced stop interrupted running tasks
EXIT_NOT_MIGRATED = 2  # the store has no tables: nothing to do until ``migrate``
EXIT_NO_METRICS = 3  # the metrics endpoint asked for cannot be served
TICK = 1.0  # longest the supervisor sleeps between looks at its children
PROGRESS_TICK = 0.25
MAX_RESPAWN_DELAY = 10.0
STORE_WAITS = (0.5, 1.0, 2.0, 5.0, 10.0)
MAX_ANNOUNCERS = 4  # at once: one stuck in a hook does not hold back the next jobs' ends
ANNOUNCE_WAIT = 10.0  # longest a stopping supervisor waits for jobs' ends to be sent
KILL_WAIT = 5.0  # longest wait for a SIGKILLed child (one stuck in the kernel) to go


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """What ``manage.py conveyor worker`` was asked to do."""

    backend: str = "default"
    queues: QueueSelector = field(default_factory=QueueSelector)
    processes: int = 1
    threads: int = 1
    max_tasks_per_child: int | None = None
    until_done: bool = False
    grace: float = 30.0
    progress: bool = False
    scheduler: bool = True  # fire due schedules (each due time fires once, fleet-wide)
    # Processes per set of queues (a fleet); empty: ``processes`` processes on ``queues``.
    pools: tuple[Pool, ...] = ()
    max_memory: int | None = None  # bytes resident past which a process is replaced
    metrics: tuple[str, int] | None = None  # where to serve Prometheus metrics: address, port

    @property
    def all_pools(self) -> tuple[Pool, ...]:
        return self.pools or (Pool(self.queues, self.processes),)


@dataclass(slots=True)
class Child:
    """One running worker process, the id its jobs are leased under, and its slots."""

    process: BaseProcess
    worker_id: str
    slots: Slots
    pool: int = 0
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Keep ``processes`` workers running; the only process that handles signals."""

    def __init__(self, settings: WorkerSettings) -> None:
        backend = worker_store(settings.backend)
        self.backend: StoreBackend = backend
        self.settings = settings
        self.lease = backend.conveyor_options.lease
        self.children: list[Child] = []
        self.spawned = 0
        self.signals = 0
        self.stop_deadline: float | None = None
        self.forced = False
        self.stop_killed: set[int] = set()  # children stopped at once for sigkill_on_stop
        self.announcers: list[BaseProcess] = []  # processes sending the ends of jobs
        self.context = multiprocessing.get_context("fork")
        self.hostname = socket.gethostname()
        self.host = new_worker_id()
        self.progress: Progress | None = None
        self.tick = min(TICK, self.lease / 3, PROGRESS_TICK if settings.progress else TICK)
        self.wake_read, self.wake_write = os.pipe()
        self.respawn_at: list[tuple[float, int]] = []  # when, and into which pool
        self.crash_streak = 0
        self.leases = Leases(backend, self.host, settings.threads)
        self.expiry = Expiry(backend)
        self.scheduler = Scheduler(backend) if settings.scheduler else None
        self.exporter: Exporter | None = None

    def run(self) -> int:
        """Supervise until stopped (or, with ``until_done``, until the queue is empty)."""
        self._install_signals()
        if self.settings.metrics is not None and not self._serve_metrics(*self.settings.metrics):
            return EXIT_NO_METRICS
        try:
            return self._supervise()
        finally:
            if self.exporter is not None:
                self.exporter.close()

    def _serve_metrics(self, address: str, port: int) -> bool:
        """Start the metrics endpoint before any process is forked; False if it cannot be."""
        from conveyor.metrics import Exporter

        try:
            self.exporter = Exporter(self.backend.alias, address, port)
        except (OSError, RuntimeError) as e:
            logger.error("Cannot serve metrics on %s:%d: %s", address, port, e)
            return False
        logger.info("Serving Prometheus metrics on %s:%d", address, self.exporter.port)
        return True

    def _supervise(self) -> int:
        if not self._wait_for_store():
            return EXIT_NOT_MIGRATED if not self.signals else EXIT_OK
        for pool in self.settings.all_pools:
            logger.info(
                "Conveyor supervisor %s: %d process(es) x %d thread(s) on backend %r, queues %s",
                self.host,
                pool.processes,
                self.settings.threads,
                self.backend.alias,
                pool.queues.describe(),
            )
        self._start_progress()
        if self.scheduler is not None:
            self.scheduler.sync()
        for index, pool in enumerate(self.settings.all_pools):
            for _ in range(pool.processes):
                self._spawn(index)
        while self.children or (self.respawn_at and not self.signals):
            self._cycle()
        self._finish()
        return EXIT_FORCED if self.forced else EXIT_OK

    def _cycle(self) -> None:
        self._sleep()
        self._reap()
        self._enforce_time_limits()
        self._respawn_due()
        self._handle_stop()
        self.leases.tick(self.children)
        self._announce()
        if not self.signals:
            self.expiry.tick()
            if self.scheduler is not None:
                self.scheduler.tick()
        self._update_progress()

    def _finish(self) -> None:
        self.leases.retry_releases()
        self._announce()
        for process in self.announcers:
            process.join(timeout=ANNOUNCE_WAIT)
        if self.progress:
            with contextlib.suppress(Exception):
                self.progress.finish()
        self._end(self.host, "forced stop" if self.forced else "stopped")
        connections.close_all()

    # --- the store at start-up ------------------------------------------------------------

    def _wait_for_store(self) -> bool:
        """Register this supervisor, waiting while the store cannot be reached."""
        for attempt in range(10**9):
            try:
                self.backend.register_worker(self._info(self.host, "supervisor", os.getpid()))
            except NotMigrated as e:
                logger.error("%s", e)
                return False
            except Exception as e:
                connections.close_all()
                wait = STORE_WAITS[min(attempt, len(STORE_WAITS) - 1)]
                log = logger.warning if attempt == 0 else logger.debug
                log(
                    "Cannot use backend %r: %s: %s. Retrying every %.0fs or so.",
                    self.backend.alias,
                    type(e).__name__,
                    str(e).strip().splitlines()[0] if str(e).strip() else "",
                    wait,
                )
                self._sleep(wait)
                if self.signals:
                    return False
                continue
            self.leases.connected()
            return True
        return False

    # --- children ------------------------------------------------------------------------

    def _spawn(self, pool: int = 0) -> None:
        self.spawned += 1
        worker_id = f"{self.host}:{self.spawned}"
        config = WorkerConfig(
            worker_id=worker_id,
            queues=self.settings.all_pools[pool].queues,
            threads=self.settings.threads,
            max_tasks=self.settings.max_tasks_per_child,
            max_memory=self.settings.max_memory,
            until_done=self.settings.until_done,
            parent_pid=os.getpid(),
        )
        size = self.settings.threads + self.backend.conveyor_options.batch_size
        slots = Slots(self.context, size, wake=self.wake_write)
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
        self.children.append(Child(process=process, worker_id=worker_id, slots=slots, pool=pool))
        logger.info("Started worker process %s (%s)", process.pid, worker_id)
        with contextlib.suppress(Exception):
            queues = self.settings.all_pools[pool].queues
            self.backend.register_worker(self._info(worker_id, "process", process.pid or 0, queues))

    def _sleep(self, timeout: float | None = None) -> None:
        # Wakes when a child exits, a signal arrives (through the wake-up pipe), or a tick.
        waitables = [self.wake_read, *(child.process.sentinel for child in self.children)]
        if timeout is None:
            timeout = min(self.tick, max(self.leases.next_beat - time.monotonic(), 0.0))
            if self.respawn_at:
                soonest = min(at for at, _ in self.respawn_at)
                timeout = max(0.0, min(timeout, soonest - time.monotonic()))
            timeout = self._until_deadline(timeout)
        with contextlib.suppress(InterruptedError):
            if self.wake_read in wait_for_sentinels(waitables, timeout=timeout):
                os.read(self.wake_read, 512)

    def _until_deadline(self, timeout: float) -> float:
        """``timeout``, or less if a running task's deadline comes sooner.

        Each child is told when the supervisor will look next before its deadlines are
        read: a task that starts after the read, with an earlier deadline, wakes it.
        """
        now = time.monotonic()
        for child in self.children:
            child.slots.will_look(now + timeout)
        deadlines = [d for child in self.children if (d := child.slots.next_deadline())]
        if not deadlines:
            return timeout
        earliest = max(0.0, min(timeout, min(deadlines) - now))
        for child in self.children:
            child.slots.will_look(now + earliest)
        return earliest

    def _reap(self) -> None:
        for child in [c for c in self.children if not c.process.is_alive()]:
            child.process.join()
            self.children.remove(child)
            code = child.process.exitcode
            crashed = code not in (EXIT_DONE, EXIT_RECYCLE, EXIT_STOPPED)
            how = _describe_exit(code)
            if child.process.pid in self.stop_killed:
                crashed, how = False, "was stopped at once: it ran a task with sigkill_on_stop"
            self.leases.release(child, f"worker process {child.process.pid} {how}", counts=crashed)
            self._end(child.worker_id, how)
            if self.signals or code == EXIT_DONE:
                continue
            delay = self._respawn_delay(child, crashed, how)
            self.respawn_at.append((time.monotonic() + delay, child.pool))
        self._respawn_due()

    def _enforce_time_limits(self) -> None:
        """Stop each child running a task past its time limit, or cancelled and not stopping.

        The child is replaced at once; its other jobs are saved or put back uncounted.
        """
        now, grace = time.monotonic(), self.backend.conveyor_options.cancel_grace
        for child in list(self.children):
            pid = child.process.pid
            if pid is None:
                continue
            # Cancelled and past its limit: the cancel wins (a time limit may be retried).
            stopped = {
                (d.key, d.token): cancel_outcome(d, pid, grace)
                for d in self.leases.overdue_cancels(child, grace)
            }
            for d in child.slots.overrun(now):
                stopped.setdefault((d.key, d.token), limit_outcome(d, pid))
            if not stopped:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            child.process.join(timeout=KILL_WAIT)
            self.children.remove(child)
            # A task that returned between the look and the kill keeps its own outcome.
            ended = {(d.key, d.token) for d in child.slots.read() if d.started < 0.0}
            self.leases.release_stopped(
                child, {key: outcome for key, outcome in stopped.items() if key not in ended}
            )
            self._end(child.worker_id, "stopped: a task ran past its time limit or was cancelled")
            if not self.signals:
                self.respawn_at.append((time.monotonic(), child.pool))

    def _announce(self) -> None:
        """Send the ends of jobs that ended here from a process of their own (one at a time)."""
        for process in [p for p in self.announcers if not p.is_alive()]:
            process.join()
            self.announcers.remove(process)
        if not self.leases.ended or len(self.announcers) >= MAX_ANNOUNCERS:
            return
        ids, self.leases.ended = self.leases.ended, []
        # Daemonic: a hook still running when the supervisor exits is cut short then.
        process = self.context.Process(
            target=announce_main,
            args=(self.backend.alias, ids),
            name="conveyor-announcer",
            daemon=True,
        )
        try:
            self.backend.before_fork()
            process.start()
        except Exception as e:
            self.leases.ended = ids + self.leases.ended  # tried again next cycle
            logger.warning("Could not start a process to announce %d job(s): %s", len(ids), e)
            return
        self.announcers.append(process)

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

    def _respawn_due(self) -> None:
        if self.signals:
            self.respawn_at.clear()
            return
        now = time.monotonic()
        for due in [due for due in self.respawn_at if due[0] <= now]:
            self.respawn_at.remove(due)
            self._spawn(due[1])

    # --- stopping --------------------------------------------------------------------------

    def _install_signals(self) -> None:
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _handle_stop(self) -> None:
        if not self.signals or not self.children:
            return
        if self.stop_deadline is None:
            logger.info(
                "Stopping: running tasks finish (up to %.0fs); send the signal again "
                "to stop them now.",
                self.settings.grace,
            )
            self.stop_deadline = time.monotonic() + self.settings.grace
            self._signal_children(signal.SIGTERM)
        if self.signals > 1 or time.monotonic() >= self.stop_deadline:
            self._force_stop()
            return
        for child in self.children:  # tasks that asked not to be waited for
            pid = child.process.pid
            if pid and pid not in self.stop_killed and child.slots.stops_at_once():
                self.stop_killed.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _force_stop(self) -> None:
        logger.warning(
            "Stopping now: %d worker process(es) are killed and their jobs put back.",
            len(self.children),
        )
        self.forced = True
        self._signal_children(signal.SIGKILL)
        for child in self.children:
            child.process.join()
            self.leases.release(
                child, "the worker was stopped before the task finished", counts=False
            )
            self._end(child.worker_id, "killed by a forced stop")
        self.children.clear()

    def _signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signum)

    # --- the workers registry and progress -----------------------------------------------

    def _info(
        self, worker_id: str, kind: str, pid: int, queues: QueueSelector | None = None
    ) -> WorkerInfo:
        shown = (
            queues.describe()
            if queues is not None
            else " | ".join(pool.queues.describe() for pool in self.settings.all_pools)
        )
        return WorkerInfo(
            id=worker_id,
            backend=self.backend.alias,
            kind=kind,
            host=self.hostname,
            pid=pid,
            supervisor=None if kind == "supervisor" else self.host,
            queues=shown,
            threads=self.settings.threads,
            started_at=timezone.now(),
        )

    def _end(self, worker_id: str, ended: str) -> None:
        try:
            self.backend.end_worker(worker_id, ended)
        except Exception as e:
            logger.warning("Could not mark worker %s stopped in the registry (%s).", worker_id, e)
            connections.close_all()

    def _served(self) -> QueueSelector:
        """The queues some process of this supervisor takes jobs from."""
        pools = self.settings.all_pools
        if len(pools) == 1 or any(pool.queues.include is None for pool in pools):
            return pools[0].queues if len(pools) == 1 else QueueSelector()
        return QueueSelector(include=frozenset().union(*(p.queues.include or () for p in pools)))

    def _start_progress(self) -> None:
        if self.settings.progress:
            try:
                self.progress = Progress(self.backend, self._served())
            except Exception as e:
                logger.warning("No progress bar: %s: %s", type(e).__name__, e)
                connections.close_all()

    def _update_progress(self) -> None:
        if self.progress is None:
            return
        try:
            self.progress.update()
        except Exception:
            connections.close_all()  # a blip in the store: the bar catches up next time


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"
