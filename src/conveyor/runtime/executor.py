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
from django.dispatch import Signal
from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.signals import task_finished, task_started
from django.utils import timezone

from conveyor.backends.base import StoreBackend, Waiter
from conveyor.records import Job, Outcome, QueueSelector, error_from_exception
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
FLUSH_DELAY = 0.02  # longest a success waits to be saved together with others
RETRY_DELAY = 0.5  # wait before saving again after the store failed
IDLE_WAKEUP_WAIT = 5.0  # with NOTIFY wake-ups, the longest idle wait when nothing is due
POOL_THREAD_TRIES = 5  # tries of a store call made from a task thread
STAGE_EVERY = 0.05  # how often a busy process makes due scheduled jobs ready


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    """How one worker process runs."""

    worker_id: str
    queues: QueueSelector
    threads: int = 1
    max_tasks: int | None = None
    until_done: bool = False
    parent_pid: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """A job that ran, waiting for its outcome to be saved."""

    job: Job
    task: Task
    result: TaskResult
    outcome: Outcome


class InlinePool:
    """Run each job at once on the calling thread.

    With one thread per process there is nothing to run beside the loop, and handing a
    job to another thread would cost a thread wake-up per task (milliseconds on an idle
    machine).
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Nothing runs in the background."""


class Executor:
    """The claim -> invoke -> record loop of one process."""

    def __init__(
        self,
        backend: StoreBackend,
        config: ExecutorConfig,
        middleware: Sequence[Middleware] | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.middleware = (
            list(middleware) if middleware is not None else [cls() for cls in DEFAULT_MIDDLEWARE]
        )
        self.pool: ThreadPoolExecutor | InlinePool = (
            ThreadPoolExecutor(config.threads, thread_name_prefix="conveyor-task")
            if config.threads > 1
            else InlinePool()
        )
        self.inflight: dict[Future[None], Job] = {}
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.waiter: Waiter | None = None
        self.submitted = 0
        self.avg_duration: float | None = None
        self.finished: queue.SimpleQueue[Finished] = queue.SimpleQueue()
        self.unsaved: list[Finished] = []
        self.flush_at = 0.0
        self.next_stage = 0.0

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def request_stop(self) -> None:
        """Stop claiming; running tasks finish, claimed but unstarted jobs go back.

        Call it from a thread, never from a signal handler (it takes locks).
        """
        self.stopping.set()
        self.changed.set()
        if self.waiter is not None:
            self.waiter.interrupt()

    def run(self) -> int:
        """Work until told to stop (or done, or recycled); return the exit code."""
        self.waiter = self.backend.waiter(self.config.queues)
        try:
            code = self._loop(self.waiter)
            self._drain()
            return code
        finally:
            self.stopping.set()
            self._close_thread_connections()
            self.pool.shutdown(wait=True)
            self._reap()
            self._save_all()
            self.waiter.close()
            self.backend.close()

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
                self._wait_changed(min(max_poll, self._until_flush()))
                continue
            room = self._room()
            jobs = self._claim(room) if room else []
            if jobs is None:  # the store failed: wait, and never take that for "empty"
                self._wait_changed(max_poll)
            elif jobs:
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

    def _drain(self) -> None:
        """Give back jobs not started yet; let running ones finish, saving as they do."""
        for future, job in list(self.inflight.items()):
            if future.cancel():
                del self.inflight[future]
                self._try_hard("give back", self.backend.unclaim, [job])
        while self.inflight:
            self._wait_changed(
                min(self.backend.conveyor_options.poll_interval, self._until_flush())
            )
            self._reap()
            self._save()

    def _close_thread_connections(self) -> None:
        # Django's connections are per thread: have every pool thread close its own. The
        # barrier holds each thread at one closing call until all threads have one.
        barrier = threading.Barrier(self.config.threads)

        def close() -> None:
            barrier.wait(timeout=60)
            connections.close_all()

        for _ in range(self.config.threads):
            self.pool.submit(close)

    # --- claiming ----------------------------------------------------------------------

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

    def _claim(self, room: int) -> list[Job] | None:
        try:
            self._stage()
            return self.backend.claim(self.worker_id, self.config.queues, room)
        except Exception:
            logger.exception("Worker %s could not claim jobs; retrying shortly.", self.worker_id)
            close_old_connections()
            return None

    def _stage(self, force: bool = False) -> None:
        """Make scheduled jobs that fell due ready, at most every ``STAGE_EVERY`` seconds."""
        now = time.monotonic()
        if force or now >= self.next_stage:
            self.next_stage = now + STAGE_EVERY
            self.backend.stage()

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
            self._try_hard("give back", self.backend.unclaim, [job])
            return
        try:
            task = self.backend.load_task(job)
        except Exception as e:
            self._reject(job, e)
            return
        result = self.backend.to_task_result(job, task, TaskResultStatus.RUNNING)
        started_at = timezone.now()
        try:
            self._send(task_started, result)
            for hook in self.middleware:
                hook.before_invoke(job, task)
            outcome = invoke(task, result)
            for hook in reversed(self.middleware):
                hook.after_invoke(job, task, outcome)
        except BaseException as e:  # a hook failed: the job still gets an outcome
            logger.exception("Worker machinery failed around job %s", job.id)
            text = "".join(traceback.format_exception(e))
            outcome = Outcome(
                started_at=started_at,
                finished_at=timezone.now(),
                error=error_from_exception(e, text),
            )
        self._note_duration(outcome)
        self.finished.put(Finished(job, task, result, outcome))

    def _reject(self, job: Job, e: Exception) -> None:
        logger.error("Job %s cannot run: %s", job.id, e)
        error = error_from_exception(e, "".join(traceback.format_exception(e)))
        self._try_hard("failure", self.backend.fail, job, error, timezone.now())

    def _note_duration(self, outcome: Outcome) -> None:
        took = (outcome.finished_at - outcome.started_at).total_seconds()
        previous = self.avg_duration
        self.avg_duration = took if previous is None else 0.8 * previous + 0.2 * took

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
        if not self.unsaved:
            return
        due = len(self.unsaved) >= self.backend.conveyor_options.batch_size
        if not (force or due) and time.monotonic() < self.flush_at:
            return
        batch, self.unsaved = self.unsaved, []
        kept = self._save_batch(batch)
        if kept:  # the store failed: keep them, and try again a little later
            self.unsaved = kept + self.unsaved
            self.flush_at = time.monotonic() + RETRY_DELAY

    def _save_all(self) -> None:
        """Save whatever is left before the process exits, trying a few times."""
        for _ in range(POOL_THREAD_TRIES):
            self._save(force=True)
            if not self.unsaved:
                return
            time.sleep(RETRY_DELAY)
        logger.error(
            "Worker %s could not save %d outcome(s); their jobs run again once put back.",
            self.worker_id,
            len(self.unsaved),
        )

    def _save_batch(self, batch: list[Finished]) -> list[Finished]:
        """Save a batch; return the items that could not be saved for now."""
        successes = [f for f in batch if f.outcome.error is None]
        failures = [f for f in batch if f.outcome.error is not None]
        saved: set[str] = set()
        if successes:
            values = [(f.job, f.outcome.return_value, f.outcome.finished_at) for f in successes]
            answer = self._try("results", self.backend.complete, values)
            if answer is None:
                return batch
            saved = answer
        for item in successes:
            self._announce(item, TaskResultStatus.SUCCESSFUL, item.job.id in saved)
        return [item for item in failures if not self._save_failure(item)]

    def _save_failure(self, item: Finished) -> bool:
        error = item.outcome.error
        assert error is not None
        recorded = self._try(
            "failure", self.backend.fail, item.job, error, item.outcome.finished_at
        )
        if recorded is None:
            return False
        logger.error(
            "Task %s failed (job %s):\n%s", item.job.task_path, item.job.id, error.traceback
        )
        self._announce(item, TaskResultStatus.FAILED, recorded)
        return True

    def _announce(self, item: Finished, status: TaskResultStatus, recorded: bool) -> None:
        if not recorded:
            logger.warning(
                "The outcome of job %s was not recorded: it had already ended, "
                "or its lease had passed to another worker.",
                item.job.id,
            )
            return
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
        self._send(task_finished, final)

    def _send(self, signal: Signal, result: TaskResult) -> None:
        """Send a task signal; a failing receiver is logged and changes nothing."""
        for receiver, response in signal.send_robust(sender=type(self.backend), task_result=result):
            if isinstance(response, Exception):
                logger.error(
                    "Receiver %r of a task signal failed for job %s",
                    receiver,
                    result.id,
                    exc_info=response,
                )

    # --- store calls -----------------------------------------------------------------------

    def _try(self, what: str, verb: Callable[..., Any], *args: Any) -> Any:
        """Call the store once; on an error log it, drop broken connections, return None."""
        try:
            return verb(*args)
        except Exception as e:
            logger.warning(
                "Worker %s could not save %s (%s); trying again.", self.worker_id, what, e
            )
            close_old_connections()
            return None

    def _try_hard(self, what: str, verb: Callable[..., Any], *args: Any) -> Any:
        """Call the store, retrying with backoff (for task threads, which may wait)."""
        for attempt in range(POOL_THREAD_TRIES):
            result = self._try(what, verb, *args)
            if result is not None:
                return result
            time.sleep(min(0.1 * 2**attempt, 2.0))
        logger.error(
            "Worker %s gave up saving %s; the job runs again once put back.", self.worker_id, what
        )
        return None
