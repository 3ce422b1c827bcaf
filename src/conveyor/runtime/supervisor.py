"""The parent process: starts worker processes, watches them, renews their leases.

It reads each child's slots (``channel.py``) to renew exactly the deliveries the child
holds (``leases.py``), and, when a child dies, to count only what it was executing. Each
cycle it sleeps until a child exits, a signal comes, a lease is due or a task's deadline
comes; then it reaps and replaces children (``processes.py``), enforces time limits and
cancels (``deadlines.py``), carries on a stop (``stopping.py``: it is the only process
that acts on signals), renews leases, and has the ends of jobs it saved announced
(``announcer.py``). It also deletes, a batch at a time, the finished jobs kept past their
retention (``retention.py``), and fires due schedules (``scheduler.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_sentinels
from typing import TYPE_CHECKING

from django.db import connections

from conveyor.backends.base import StoreBackend, worker_store
from conveyor.exceptions import NotMigrated
from conveyor.records import Pool, QueueSelector, new_worker_id
from conveyor.runtime.announcer import Announcers
from conveyor.runtime.deadlines import Deadlines
from conveyor.runtime.leases import Leases
from conveyor.runtime.processes import Processes
from conveyor.runtime.progress import Progress
from conveyor.runtime.registry import Registry
from conveyor.runtime.retention import Expiry
from conveyor.runtime.scheduler import Scheduler
from conveyor.runtime.stopping import Stop

if TYPE_CHECKING:
    from conveyor.runtime.exporter import Exporter

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1  # a forced stop interrupted running tasks
EXIT_NOT_MIGRATED = 2  # the store has no tables: nothing to do until ``migrate``
EXIT_NO_METRICS = 3  # the metrics endpoint asked for cannot be served
TICK = 1.0  # longest the supervisor sleeps between looks at its children
PROGRESS_TICK = 0.25
STORE_WAITS = (0.5, 1.0, 2.0, 5.0, 10.0)


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


class Supervisor:
    """Keep ``processes`` workers running; the only process that handles signals."""

    def __init__(self, settings: WorkerSettings) -> None:
        backend = worker_store(settings.backend)
        self.backend: StoreBackend = backend
        self.settings = settings
        self.lease = backend.conveyor_options.lease
        self.host = new_worker_id()
        self.progress: Progress | None = None
        self.tick = min(TICK, self.lease / 3, PROGRESS_TICK if settings.progress else TICK)
        self.wake_read, self.wake_write = os.pipe()
        self.leases = Leases(backend, self.host, settings.threads)
        self.registry = Registry(backend, self.host, settings.all_pools, settings.threads)
        self.stop = Stop(settings.grace)
        self.processes = Processes(
            backend,
            settings,
            self.host,
            self.leases,
            self.registry,
            self.wake_write,
            self.stop.asked,
        )
        self.deadlines = Deadlines(backend, self.processes, self.leases, self.registry)
        self.announcers = Announcers(backend, self.leases)
        self.expiry = Expiry(backend)
        self.scheduler = Scheduler(backend) if settings.scheduler else None
        self.exporter: Exporter | None = None

    def run(self) -> int:
        """Supervise until stopped (or, with ``until_done``, until the queue is empty)."""
        self.stop.install(self.wake_write)
        if self.settings.metrics is not None and not self._serve_metrics(*self.settings.metrics):
            return EXIT_NO_METRICS
        try:
            return self._supervise()
        finally:
            if self.exporter is not None:
                self.exporter.close()

    def _serve_metrics(self, address: str, port: int) -> bool:
        """Start the metrics endpoint before any process is forked; False if it cannot be."""
        from conveyor.runtime.exporter import Exporter

        try:
            self.exporter = Exporter(self.backend.alias, address, port)
        except (OSError, RuntimeError) as e:
            logger.error("Cannot serve metrics on %s:%d: %s", address, port, e)
            return False
        logger.info("Serving Prometheus metrics on %s:%d", address, self.exporter.port)
        return True

    def _supervise(self) -> int:
        if not self._wait_for_store():
            return EXIT_NOT_MIGRATED if not self.stop.signals else EXIT_OK
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
            self.processes.start_soon(index, pool.processes)
        while self.processes.children or (self.processes.respawn_at and not self.stop.signals):
            self._cycle()
        self._finish()
        return EXIT_FORCED if self.stop.forced else EXIT_OK

    def _cycle(self) -> None:
        self._sleep()
        self.processes.reap()
        self.deadlines.enforce()
        self.processes.respawn_due(until=self._other_work_due)
        self.stop.handle(self.processes)
        self.leases.tick(self.processes.children)
        self.announcers.announce()
        if not self.stop.signals:
            self.expiry.tick()
            if self.scheduler is not None:
                self.scheduler.tick()
        self._update_progress()

    def _other_work_due(self) -> bool:
        """Say whether a stop, a time limit, an overdue cancel or a heartbeat is due:
        starting processes waits for it."""
        if self.stop.signals or time.monotonic() >= self.leases.next_beat:
            return True
        return self.deadlines.due()

    def _finish(self) -> None:
        self.leases.retry_releases()
        self.announcers.finish()
        if self.progress:
            with contextlib.suppress(Exception):
                self.progress.finish()
        self.registry.end(self.host, "forced stop" if self.stop.forced else "stopped")
        connections.close_all()

    def _wait_for_store(self) -> bool:
        """Register this supervisor, waiting while the store cannot be reached."""
        for attempt in range(10**9):
            try:
                self.registry.register(self.host, "supervisor", os.getpid())
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
                if self.stop.signals:
                    return False
                continue
            self.leases.connected()
            return True
        return False

    def _sleep(self, timeout: float | None = None) -> None:
        # Wakes when a child exits, a signal arrives (through the wake-up pipe), or a tick.
        children = self.processes.children
        waitables = [self.wake_read, *(child.process.sentinel for child in children)]
        if timeout is None:
            timeout = min(self.tick, max(self.leases.next_beat - time.monotonic(), 0.0))
            if self.processes.respawn_at:
                soonest = min(at for at, _ in self.processes.respawn_at)
                timeout = max(0.0, min(timeout, soonest - time.monotonic()))
            timeout = self.deadlines.until_next(timeout)
        with contextlib.suppress(InterruptedError):
            if self.wake_read in wait_for_sentinels(waitables, timeout=timeout):
                os.read(self.wake_read, 512)

    # --- progress --------------------------------------------------------------------------

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
