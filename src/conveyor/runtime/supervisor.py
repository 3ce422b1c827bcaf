"""The parent process: starts worker processes, watches them, renews their leases."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess
from types import FrameType

from django.db import connections
from django.tasks import task_backends
from django.utils import timezone

from conveyor.backends.base import StoreBackend
from conveyor.exceptions import ConveyorImproperlyConfigured
from conveyor.records import QueueSelector, WorkerInfo
from conveyor.runtime.executor import (
    EXIT_DONE,
    EXIT_ORPHANED,
    EXIT_RECYCLE,
    EXIT_STOPPED,
    Executor,
    ExecutorConfig,
)
from conveyor.runtime.progress import Progress

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1  # a forced stop interrupted running tasks
TICK = 1.0  # longest the supervisor sleeps between looks at its children
PROGRESS_TICK = 0.25
QUICK_CRASH = 2.0  # a child that dies sooner than this after starting is respawned later
MAX_RESPAWN_DELAY = 10.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
PR_SET_PDEATHSIG = 1


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


@dataclass(slots=True)
class Child:
    """One running worker process and the id its jobs are leased under."""

    process: BaseProcess
    worker_id: str
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Keep ``processes`` workers running; the only process that handles signals."""

    def __init__(self, settings: WorkerSettings) -> None:
        backend = task_backends[settings.backend]
        if not isinstance(backend, StoreBackend):
            raise ConveyorImproperlyConfigured(
                f"TASKS[{settings.backend!r}] uses {type(backend).__name__}, which a Conveyor "
                "worker cannot drive; use a conveyor.backends backend."
            )
        self.backend: StoreBackend = backend
        self.settings = settings
        self.children: list[Child] = []
        self.spawned = 0
        self.signals = 0
        self.stop_deadline: float | None = None
        self.forced = False
        self.context = multiprocessing.get_context("fork")
        self.hostname = socket.gethostname()
        self.host = f"{self.hostname[:50]}:{os.getpid()}:{secrets.token_hex(8)}"
        self.progress = Progress(self.backend, settings.queues) if settings.progress else None
        lease = self.backend.conveyor_options.lease
        self.tick = min(TICK, lease / 3, PROGRESS_TICK if settings.progress else TICK)
        self.wake_read, self.wake_write = os.pipe()
        self.respawn_at: list[float] = []
        self.crash_streak = 0

    def run(self) -> int:
        """Supervise until stopped (or, with ``until_done``, until the queue is empty)."""
        self._install_signals()
        opts = self.backend.conveyor_options
        logger.info(
            "Conveyor supervisor %s: %d process(es) x %d thread(s) on backend %r",
            self.host,
            self.settings.processes,
            self.settings.threads,
            self.backend.alias,
        )
        self._register(self.host, "supervisor", os.getpid())
        self._recover()
        for _ in range(self.settings.processes):
            self._spawn()
        next_beat = next_recover = time.monotonic()
        while self.children or (self.respawn_at and not self.signals):
            self._sleep()
            self._reap()
            self._respawn_due()
            self._handle_stop()
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + opts.lease / 3
            if now >= next_recover:
                self._recover()
                next_recover = now + opts.lease / 2 * random.uniform(0.8, 1.2)
            if self.progress:
                self.progress.update()
        if self.progress:
            self.progress.finish()
        self._end(self.host, "forced stop" if self.forced else "stopped")
        connections.close_all()
        return EXIT_FORCED if self.forced else EXIT_OK

    # --- children ------------------------------------------------------------------------

    def _spawn(self) -> None:
        self.spawned += 1
        worker_id = f"{self.host}:{self.spawned}"
        config = ExecutorConfig(
            worker_id=worker_id,
            queues=self.settings.queues,
            threads=self.settings.threads,
            max_tasks=self.settings.max_tasks_per_child,
            until_done=self.settings.until_done,
            parent_pid=os.getpid(),
        )
        self.backend.before_fork()
        process = self.context.Process(
            target=_child_main,
            args=(self.backend.alias, config),
            name=f"conveyor-{worker_id}",
            daemon=False,
        )
        # The child inherits these signals blocked, and takes them with sigwait() once it
        # is ready: no signal is lost or handled by the parent's handler in between.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.children.append(Child(process=process, worker_id=worker_id))
        logger.info("Started worker process %s (%s)", process.pid, worker_id)
        self._register(worker_id, "process", process.pid or 0)

    def _sleep(self) -> None:
        # Wakes when a child exits, a signal arrives (through the wake-up pipe), or a tick.
        waitables = [self.wake_read, *(child.process.sentinel for child in self.children)]
        timeout = self.tick
        if self.respawn_at:
            timeout = max(0.0, min(timeout, min(self.respawn_at) - time.monotonic()))
        with contextlib.suppress(InterruptedError):
            if self.wake_read in wait_for_sentinels(waitables, timeout=timeout):
                os.read(self.wake_read, 512)

    def _reap(self) -> None:
        for child in [c for c in self.children if not c.process.is_alive()]:
            child.process.join()
            self.children.remove(child)
            code = child.process.exitcode
            crashed = code not in (EXIT_DONE, EXIT_RECYCLE, EXIT_STOPPED)
            self._release(child, _describe_exit(child.process.pid, code), counts=crashed)
            self._end(child.worker_id, _describe_exit(None, code))
            if self.signals or code == EXIT_DONE:
                continue
            delay = 0.0
            if crashed:
                quick = time.monotonic() - child.started < QUICK_CRASH
                self.crash_streak = self.crash_streak + 1 if quick else 0
                delay = min(0.1 * 2**self.crash_streak, MAX_RESPAWN_DELAY) if quick else 0.0
                logger.error(
                    "Worker process %s died (%s); starting another in %.1fs.",
                    child.process.pid,
                    _describe_exit(None, code),
                    delay,
                )
            self.respawn_at.append(time.monotonic() + delay)
        self._respawn_due()

    def _respawn_due(self) -> None:
        if self.signals:
            self.respawn_at.clear()
            return
        now = time.monotonic()
        for at in [at for at in self.respawn_at if at <= now]:
            self.respawn_at.remove(at)
            self._spawn()

    def _release(self, child: Child, reason: str, *, counts: bool) -> None:
        try:
            count = self.backend.release(child.worker_id, reason, counts_as_attempt=counts)
        except Exception:
            logger.exception(
                "Could not put back the jobs of %s; their leases will expire.", child.worker_id
            )
            return
        if count:
            logger.warning("Put back %d job(s) of worker %s: %s", count, child.worker_id, reason)

    # --- stopping --------------------------------------------------------------------------

    def _install_signals(self) -> None:
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

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
        elif self.signals > 1 or time.monotonic() >= self.stop_deadline:
            self._force_stop()

    def _force_stop(self) -> None:
        logger.warning(
            "Stopping now: %d worker process(es) are killed and their jobs put back.",
            len(self.children),
        )
        self.forced = True
        self._signal_children(signal.SIGKILL)
        for child in self.children:
            child.process.join()
            self._release(child, "the worker was stopped before the task finished", counts=False)
            self._end(child.worker_id, "killed by a forced stop")
        self.children.clear()

    def _signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signum)

    # --- leases ------------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        try:
            self.backend.heartbeat([self.host, *(child.worker_id for child in self.children)])
        except Exception:
            logger.exception("Heartbeat failed; retrying on the next beat.")
            connections.close_all()

    def _recover(self) -> None:
        try:
            count = self.backend.recover()
        except Exception:
            logger.exception("Could not look for jobs with expired leases.")
            connections.close_all()
            return
        if count:
            logger.warning("Recovered %d job(s) whose worker stopped heartbeating.", count)

    # --- the workers registry ------------------------------------------------------------

    def _register(self, worker_id: str, kind: str, pid: int) -> None:
        info = WorkerInfo(
            id=worker_id,
            backend=self.backend.alias,
            kind=kind,
            host=self.hostname,
            pid=pid,
            supervisor=None if kind == "supervisor" else self.host,
            queues=_describe_queues(self.settings.queues),
            threads=self.settings.threads,
            started_at=timezone.now(),
        )
        try:
            self.backend.register_worker(info)
        except Exception:
            logger.exception("Could not register %s %s in the workers registry.", kind, worker_id)
            connections.close_all()

    def _end(self, worker_id: str, ended: str) -> None:
        try:
            self.backend.end_worker(worker_id, ended)
        except Exception:
            logger.exception("Could not mark worker %s stopped in the registry.", worker_id)
            connections.close_all()


def _describe_queues(queues: QueueSelector) -> str:
    if queues.include is not None:
        return ",".join(sorted(queues.include))
    if queues.exclude:
        return "* -" + ",".join(sorted(queues.exclude))
    return "*"


def _describe_exit(pid: int | None, code: int | None) -> str:
    who = f"worker process {pid}" if pid else "it"
    if code is not None and code < 0:
        return f"{who} was killed by signal {signal.Signals(-code).name}"
    return f"{who} exited with code {code}"


def _die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel kill this process if the supervisor dies (Linux).

    Nobody renews this process's leases once its supervisor is gone, so another worker may
    take its jobs over; it must not go on running them.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)


def _watch_signals(executor: Executor) -> None:
    """Take the stop signals in a thread of their own; SIGINT is the supervisor's to act on."""
    while True:
        if signal.sigwait(STOP_SIGNALS) == signal.SIGTERM:
            executor.request_stop()


def _child_main(alias: str, config: ExecutorConfig) -> None:
    """Entry point of a worker process (stop signals arrive blocked, see Supervisor._spawn)."""
    signal.set_wakeup_fd(-1)  # the pipe is the supervisor's
    _die_with_parent(config.parent_pid)
    backend = task_backends[alias]
    assert isinstance(backend, StoreBackend)  # the supervisor checked it
    backend.after_fork()
    executor = Executor(backend, config)
    threading.Thread(
        target=_watch_signals, args=(executor,), daemon=True, name="conveyor-signals"
    ).start()
    time.sleep(random.uniform(0, 0.02))  # spread the first claims of sibling processes
    code = executor.run()
    connections.close_all()
    sys.exit(code)
