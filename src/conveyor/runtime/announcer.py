"""Send ``task_finished`` and run hooks for jobs that ended in the supervisor's hands.

When a supervisor saves the outcome of a worker process that died (or fails a job lost
too often), the task's own code (signal receivers, ``on_success``/``on_failure`` hooks)
must still run, but never in the supervisor: a slow hook there would hold its heartbeats
and time limits. A short-lived process of its own reads each result back and announces it;
a few such processes may run at once (``MAX_ANNOUNCERS``), so one stuck in a hook does not
hold back the next jobs' ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from django.db import connections
from django.tasks import TaskResult, task_backends
from django.tasks.signals import task_finished

from conveyor import tracing
from conveyor.backends.base import StoreBackend
from conveyor.records import Outcome
from conveyor.runtime import exporter
from conveyor.runtime.leases import Leases
from conveyor.runtime.middleware import run_hooks
from conveyor.runtime.runner import send
from conveyor.signals import task_retried

logger = logging.getLogger(__name__)

MAX_ANNOUNCERS = 4  # at once: one stuck in a hook does not hold back the next jobs' ends
ANNOUNCE_WAIT = 10.0  # longest a stopping supervisor waits for jobs' ends to be sent


class Announcers:
    """The processes a supervisor starts to announce the jobs that ended in its hands."""

    def __init__(self, backend: StoreBackend, leases: Leases) -> None:
        self.backend = backend
        self.leases = leases  # whose ``ended`` lists the jobs to announce
        self.context = multiprocessing.get_context("fork")
        self.running: list[BaseProcess] = []
        self.places: dict[BaseProcess, int] = {}  # each running announcer's place

    def announce(self) -> None:
        """Send the ends of jobs that ended here from a process of their own (one at a time)."""
        for process in [p for p in self.running if not p.is_alive()]:
            process.join()
            self.running.remove(process)
            self.places.pop(process, None)
        leases = self.leases
        if not (leases.ended or leases.retried) or len(self.running) >= MAX_ANNOUNCERS:
            return
        ids, retried = leases.ended, leases.retried
        leases.ended, leases.retried = [], []
        taken = {self.places[p] for p in self.running}
        place = next(n for n in range(1, MAX_ANNOUNCERS + 1) if n not in taken)
        # Daemonic: a hook still running when the supervisor exits is cut short then.
        process = self.context.Process(
            target=announce_main,
            args=(self.backend.alias, ids, retried, f"announcer-{place}"),
            name="conveyor-announcer",
            daemon=True,
        )
        try:
            with exporter.forking() as free:
                if free:
                    self.backend.before_fork()
                    process.start()
        except Exception as e:
            leases.ended, leases.retried = ids + leases.ended, retried + leases.retried
            logger.warning("Could not start a process to announce %d job(s): %s", len(ids), e)
            return
        if not free:  # a scrape is reading: announced at the next look
            leases.ended, leases.retried = ids + leases.ended, retried + leases.retried
            return
        self.running.append(process)
        self.places[process] = place

    def finish(self) -> None:
        """Announce what is left (as announcers become free), then wait for them."""
        deadline = time.monotonic() + ANNOUNCE_WAIT
        self.announce()
        while (self.leases.ended or self.leases.retried) and time.monotonic() < deadline:
            time.sleep(0.1)
            self.announce()
        left = len(self.leases.ended) + len(self.leases.retried)
        if left:
            logger.warning(
                "Stopping with %d job end(s) or retries not announced (no announcer was free "
                "in %.0fs): their signals and hooks are not sent.",
                left,
                ANNOUNCE_WAIT,
            )
        for process in self.running:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))

    def wait(self) -> None:
        """Give each running announcer up to ``ANNOUNCE_WAIT`` to finish."""
        for process in self.running:
            process.join(timeout=ANNOUNCE_WAIT)


def announce_main(
    alias: str,
    job_ids: Sequence[str],
    retried: Sequence[tuple[str, Outcome]] = (),
    place: str = "",
) -> None:
    """Entry point of an announcer process."""
    exporter.take_slot(place)
    signal.set_wakeup_fd(-1)  # the supervisor's pipe, inherited over fork, is not ours
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    backend = task_backends[alias]
    assert isinstance(backend, StoreBackend)
    backend.after_fork()
    try:
        for job_id in job_ids:
            if (result := _read_back(backend, job_id, "end")) is not None:
                send(backend, task_finished, result)
                run_hooks(result)
        for job_id, outcome in retried:
            if (result := _read_back(backend, job_id, "retry")) is not None:
                send(
                    backend,
                    task_retried,
                    result,
                    error=outcome.error,
                    retry_at=outcome.retry_at,
                    started_at=outcome.started_at,
                    finished_at=outcome.finished_at,
                )
    finally:
        connections.close_all()
        tracing.flush()


def _read_back(backend: StoreBackend, job_id: str, what: str) -> TaskResult | None:
    """The job as stored now, or None (logged) if it cannot be read."""
    try:
        return backend.get_result(job_id)
    except Exception:
        connections.close_all()
        logger.exception("Could not read back job %s to announce its %s", job_id, what)
        return None
