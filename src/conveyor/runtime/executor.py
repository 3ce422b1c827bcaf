"""One worker process: claim jobs, run them on a thread pool, record what happened."""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.db import close_old_connections
from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.signals import task_finished, task_started
from django.utils import timezone

from conveyor.backends.base import ConveyorBackend, Waiter, error_from_exception
from conveyor.records import Job, Outcome, QueueSelector
from conveyor.runtime.invocation import invoke
from conveyor.runtime.middleware import DEFAULT_MIDDLEWARE, Middleware

logger = logging.getLogger(__name__)

# Exit codes of a worker process, read by the supervisor.
EXIT_STOPPED = 0  # asked to stop, and did
EXIT_DONE = 3  # --until-done: nothing was left to do
EXIT_RECYCLE = 4  # --max-tasks-per-child reached: start a fresh process
EXIT_ORPHANED = 5  # the supervisor went away

MIN_POLL = 0.005  # first idle wait; doubles up to the backend's poll interval
PREFETCH_HORIZON = 0.05  # claim ahead only as many jobs as finish within this many seconds
PERSIST_TRIES = 6


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    """How one worker process runs."""

    worker_id: str
    queues: QueueSelector
    threads: int = 1
    max_tasks: int | None = None
    until_done: bool = False
    parent_pid: int | None = None


class Executor:
    """The claim -> invoke -> record loop of one process."""

    def __init__(self, backend: ConveyorBackend, config: ExecutorConfig,
                 middleware: Sequence[Middleware] | None = None) -> None:
        self.backend = backend
        self.config = config
        self.middleware = list(middleware) if middleware is not None else [
            cls() for cls in DEFAULT_MIDDLEWARE]
        self.pool = ThreadPoolExecutor(config.threads, thread_name_prefix="conveyor-task")
        self.inflight: dict[Future[None], Job] = {}
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.submitted = 0
        self.avg_duration: float | None = None

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def request_stop(self) -> None:
        """Stop claiming; running tasks finish, claimed but unstarted jobs go back."""
        self.stopping.set()
        self.changed.set()

    def run(self) -> int:
        """Work until told to stop (or done, or recycled); return the exit code."""
        waiter = self.backend.waiter(self.config.queues)
        try:
            return self._loop(waiter)
        finally:
            self.stopping.set()
            self.pool.shutdown(wait=True)
            self._reap()
            waiter.close()
            self.backend.close()

    def _loop(self, waiter: Waiter) -> int:
        poll = MIN_POLL
        max_poll = self.backend.conveyor_options.poll_interval
        while not self.stopping.is_set():
            self._reap()
            if self._orphaned():
                logger.warning("Supervisor went away; worker %s stops.", self.worker_id)
                return EXIT_ORPHANED
            if self._budget_spent():
                if not self.inflight:
                    return EXIT_RECYCLE
                self._wait_changed(max_poll)
                continue
            room = self._room()
            jobs = self._claim(room) if room else []
            if jobs:
                for job in jobs:
                    self._submit(job)
                poll = MIN_POLL
            elif self.inflight:
                # Slots are full (wait for one to free) or nothing is ready yet (poll).
                self._wait_changed(poll if room else max_poll)
                poll = min(poll * 2, max_poll) if room else poll
            elif self.config.until_done:
                return EXIT_DONE
            else:
                woke = waiter.wait(poll)
                poll = MIN_POLL if woke else min(poll * 2, max_poll)
        return EXIT_STOPPED

    # --- claiming ----------------------------------------------------------------------

    def _room(self) -> int:
        threads = self.config.threads
        window = threads
        if self.avg_duration is not None and self.avg_duration < PREFETCH_HORIZON:
            ahead = int(threads * PREFETCH_HORIZON / max(self.avg_duration, 1e-4))
            window = min(max(threads, ahead), self.backend.conveyor_options.batch_size)
        room = window - len(self.inflight)
        if self.config.max_tasks is not None:
            room = min(room, self.config.max_tasks - self.submitted)
        return max(room, 0)

    def _budget_spent(self) -> bool:
        return self.config.max_tasks is not None and self.submitted >= self.config.max_tasks

    def _claim(self, room: int) -> list[Job]:
        try:
            return self.backend.claim(self.worker_id, self.config.queues, room)
        except Exception:
            logger.exception("Worker %s could not claim jobs; retrying shortly.", self.worker_id)
            close_old_connections()
            self.stopping.wait(self.backend.conveyor_options.poll_interval)
            return []

    def _orphaned(self) -> bool:
        return self.config.parent_pid is not None and os.getppid() != self.config.parent_pid

    def _submit(self, job: Job) -> None:
        self.submitted += 1
        future = self.pool.submit(self._run_job, job)
        self.inflight[future] = job
        future.add_done_callback(lambda _: self.changed.set())

    def _wait_changed(self, timeout: float) -> None:
        self.changed.wait(timeout)
        self.changed.clear()

    def _reap(self) -> None:
        for future in [f for f in self.inflight if f.done()]:
            job = self.inflight.pop(future)
            if not future.cancelled() and future.exception() is not None:
                logger.error("Worker %s crashed on job %s", self.worker_id, job.id,
                             exc_info=future.exception())

    # --- running one job (on a pool thread) ---------------------------------------------

    def _run_job(self, job: Job) -> None:
        if self.stopping.is_set():
            self._persist("give back", self.backend.unclaim, job, self.worker_id)
            return
        try:
            task = self.backend.load_task(job)
        except Exception as e:
            self._reject(job, e)
            return
        result = self.backend.to_task_result(job, task, TaskResultStatus.RUNNING)
        task_started.send(sender=type(self.backend), task_result=result)
        for hook in self.middleware:
            hook.before_invoke(job, task)
        outcome = invoke(task, result)
        for hook in reversed(self.middleware):
            hook.after_invoke(job, task, outcome)
        self._note_duration(outcome)
        self._record(job, task, result, outcome)

    def _reject(self, job: Job, e: Exception) -> None:
        logger.error("Job %s cannot run: %s", job.id, e)
        error = error_from_exception(e, "".join(traceback.format_exception(e)))
        self._persist("failure", self.backend.fail, job, self.worker_id, error,
                      timezone.now())

    def _record(self, job: Job, task: Task, result: TaskResult, outcome: Outcome) -> None:
        if outcome.error is None:
            saved = self._persist("result", self.backend.complete, job, self.worker_id,
                                  outcome.return_value, outcome.finished_at)
            final = self.backend.to_task_result(
                job, task, TaskResultStatus.SUCCESSFUL, finished_at=outcome.finished_at,
                return_value=outcome.return_value)
        else:
            logger.error("Task %s failed (job %s):\n%s", job.task_path, job.id,
                         outcome.error.traceback)
            saved = self._persist("failure", self.backend.fail, job, self.worker_id,
                                  outcome.error, outcome.finished_at)
            final = self.backend.to_task_result(
                job, task, TaskResultStatus.FAILED, finished_at=outcome.finished_at,
                errors=[*result.errors, outcome.error])
        if saved:
            task_finished.send(sender=type(self.backend), task_result=final)
        else:
            logger.warning("The outcome of job %s was not recorded: it had already ended, "
                           "or its lease had passed to another worker.", job.id)

    def _persist(self, what: str, verb: Callable[..., bool], job: Job, *args: Any) -> bool:
        for attempt in range(PERSIST_TRIES):
            try:
                return verb(job, *args)
            except Exception as e:
                logger.warning("Could not save the %s of job %s (%s); trying again.",
                               what, job.id, e)
                close_old_connections()
                time.sleep(min(0.05 * 2**attempt, 2.0))
        logger.error("Gave up saving the %s of job %s; it will run again once released.",
                     what, job.id)
        return False

    def _note_duration(self, outcome: Outcome) -> None:
        took = (outcome.finished_at - outcome.started_at).total_seconds()
        previous = self.avg_duration
        self.avg_duration = took if previous is None else 0.8 * previous + 0.2 * took
