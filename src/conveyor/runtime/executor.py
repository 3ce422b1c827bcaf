"""One worker process: claim jobs, run them on a thread pool, record what happened."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.db import close_old_connections, connections
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
IDLE_WAKEUP_WAIT = 5.0  # with NOTIFY wake-ups, the longest idle wait when nothing is due
FLUSH_DELAY = 0.02  # longest a success waits to be saved together with others


@dataclass(frozen=True, slots=True)
class Finished:
    """A job that ran, waiting for its outcome to be saved."""

    job: Job
    task: Task
    result: TaskResult
    outcome: Outcome


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

    def __init__(
        self,
        backend: ConveyorBackend,
        config: ExecutorConfig,
        middleware: Sequence[Middleware] | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.middleware = (
            list(middleware) if middleware is not None else [cls() for cls in DEFAULT_MIDDLEWARE]
        )
        self.pool = ThreadPoolExecutor(config.threads, thread_name_prefix="conveyor-task")
        self.inflight: dict[Future[None], Job] = {}
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.submitted = 0
        self.avg_duration: float | None = None
        self.finished: queue.SimpleQueue[Finished] = queue.SimpleQueue()
        self.unsaved: list[Finished] = []
        self.flush_at = 0.0

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
            self._close_thread_connections()
            self.pool.shutdown(wait=True)
            self._reap()
            self._save(force=True)
            waiter.close()
            self.backend.close()

    def _close_thread_connections(self) -> None:
        # Django's connections are per thread: have every pool thread close its own. The
        # barrier holds each thread at one closing call until all threads have one.
        barrier = threading.Barrier(self.config.threads)

        def close() -> None:
            barrier.wait(timeout=60)
            connections.close_all()

        for _ in range(self.config.threads):
            self.pool.submit(close)

    def _loop(self, waiter: Waiter) -> int:
        poll = MIN_POLL
        max_poll = self.backend.conveyor_options.poll_interval
        while not self.stopping.is_set():
            self._reap()
            self._save(force=not self.inflight)
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
                self._wait_changed(min(poll if room else max_poll, self._until_flush()))
                poll = min(poll * 2, max_poll) if room else poll
            elif self.config.until_done:
                return EXIT_DONE
            else:
                woke = waiter.wait(self._idle_wait(poll))
                poll = MIN_POLL if woke else min(poll * 2, max_poll)
        return EXIT_STOPPED

    def _idle_wait(self, poll: float) -> float:
        """How long to wait for work: woken backends sleep until the next due job."""
        if not self.backend.supports_wakeup or poll < self.backend.conveyor_options.poll_interval:
            return poll
        try:
            due = self.backend.next_due(self.config.queues)
        except Exception:
            logger.exception("Worker %s could not read the next due time.", self.worker_id)
            return poll
        if due is None:
            return IDLE_WAKEUP_WAIT
        return min(max((due - timezone.now()).total_seconds(), MIN_POLL), IDLE_WAKEUP_WAIT)

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
                logger.error(
                    "Worker %s crashed on job %s",
                    self.worker_id,
                    job.id,
                    exc_info=future.exception(),
                )

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
        self.finished.put(Finished(job, task, result, outcome))

    def _reject(self, job: Job, e: Exception) -> None:
        logger.error("Job %s cannot run: %s", job.id, e)
        error = error_from_exception(e, "".join(traceback.format_exception(e)))
        self._persist("failure", self.backend.fail, job, self.worker_id, error, timezone.now())

    # --- saving outcomes (on the main thread) ----------------------------------------------

    def _until_flush(self) -> float:
        if not self.unsaved:
            return self.backend.conveyor_options.poll_interval
        return max(0.0, self.flush_at - time.monotonic())

    def _save(self, force: bool = False) -> None:
        """Save finished jobs' outcomes, successes together in one statement."""
        while True:
            try:
                item = self.finished.get_nowait()
            except queue.Empty:
                break
            if not self.unsaved:
                self.flush_at = time.monotonic() + FLUSH_DELAY
            self.unsaved.append(item)
        due = len(self.unsaved) >= self.backend.conveyor_options.batch_size
        if not self.unsaved or not (force or due or time.monotonic() >= self.flush_at):
            return
        batch, self.unsaved = self.unsaved, []
        successes = [f for f in batch if f.outcome.error is None]
        saved = self._save_successes(successes) if successes else set()
        for item in batch:
            if item.outcome.error is not None:
                self._save_failure(item)
            elif item.job.id in saved:
                self._finished(item, TaskResultStatus.SUCCESSFUL)
            else:
                self._not_saved(item.job)

    def _save_successes(self, successes: list[Finished]) -> set[str]:
        values = [(f.job, f.outcome.return_value, f.outcome.finished_at) for f in successes]
        saved = self._persist("results", self.backend.complete_many, self.worker_id, values)
        return saved if isinstance(saved, set) else set()

    def _save_failure(self, item: Finished) -> None:
        error = item.outcome.error
        assert error is not None
        logger.error(
            "Task %s failed (job %s):\n%s", item.job.task_path, item.job.id, error.traceback
        )
        if self._persist(
            "failure", self.backend.fail, item.job, self.worker_id, error, item.outcome.finished_at
        ):
            self._finished(item, TaskResultStatus.FAILED)
        else:
            self._not_saved(item.job)

    def _finished(self, item: Finished, status: TaskResultStatus) -> None:
        outcome = item.outcome
        errors = [*item.result.errors, outcome.error] if outcome.error else item.result.errors
        final = self.backend.to_task_result(
            item.job,
            item.task,
            status,
            finished_at=outcome.finished_at,
            return_value=outcome.return_value,
            errors=errors,
        )
        task_finished.send(sender=type(self.backend), task_result=final)

    def _not_saved(self, job: Job) -> None:
        logger.warning(
            "The outcome of job %s was not recorded: it had already ended, "
            "or its lease had passed to another worker.",
            job.id,
        )

    def _persist(self, what: str, verb: Callable[..., Any], *args: Any) -> Any:
        for attempt in range(PERSIST_TRIES):
            try:
                return verb(*args)
            except Exception as e:
                logger.warning(
                    "Could not save the %s of worker %s (%s); trying again.",
                    what,
                    self.worker_id,
                    e,
                )
                close_old_connections()
                time.sleep(min(0.05 * 2**attempt, 2.0))
        logger.error(
            "Gave up saving the %s of worker %s; the jobs run again once released.",
            what,
            self.worker_id,
        )
        return False

    def _note_duration(self, outcome: Outcome) -> None:
        took = (outcome.finished_at - outcome.started_at).total_seconds()
        previous = self.avg_duration
        self.avg_duration = took if previous is None else 0.8 * previous + 0.2 * took
