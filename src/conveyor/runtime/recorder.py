"""Save outcomes: together under load, at once when idle, and never wedged by one bad row.

A failed save is one of two things. The store is unreachable: keep the outcomes and try
again later (the loop stops taking work meanwhile). Or the store refused this row (a value
the database cannot hold): the job alone is failed with the database's message and its
neighbours are saved without it. An outcome that cannot be recorded even as a failure
puts the job back counted, so the poison limit ends it. ``task_finished`` is sent once
for each outcome recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from django.db import close_old_connections
from django.tasks import TaskResult, TaskResultStatus
from django.tasks.signals import task_finished

from conveyor.backends.base import StoreBackend
from conveyor.records import Disposition, Outcome, error_from_text
from conveyor.runtime.middleware import Middleware, run_hooks
from conveyor.runtime.runner import Finished, send
from conveyor.signals import task_retried

logger = logging.getLogger(__name__)

FLUSH_DELAY = 0.02  # longest a success waits to be saved together with others
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)  # between tries while the store is unreachable
REFUSED = "conveyor.exceptions.OutcomeRefused"
STRIKES = 4  # failed saves, alone and spread over seconds, before a row is blamed


class Recorder:
    """The outcomes of one worker process, on their way to the store."""

    def __init__(
        self,
        backend: StoreBackend,
        middleware: Sequence[Middleware],
        done: Callable[[Finished], None],
    ) -> None:
        self.backend = backend
        self.middleware = list(middleware)
        self.done = done  # called once an item is settled: recorded, refused or given up
        self.batch_size = backend.conveyor_options.batch_size
        self.pending: list[Finished] = []
        self.oldest = 0.0
        self.failures = 0
        self.retry_at = 0.0
        self.saving = 0
        self.strikes: dict[tuple[int, str], int] = {}  # failed saves of one outcome alone
        # The loop adds and saves; a watchdog thread may save too while a long task holds
        # the loop's thread, so that finished jobs are not left waiting behind it.
        self.lock = threading.RLock()

    def add(self, item: Finished) -> None:
        with self.lock:
            if not self.pending:
                self.oldest = time.monotonic()
            self.pending.append(item)

    @property
    def backlog(self) -> int:
        """Outcomes not settled yet, counting those being saved right now."""
        return len(self.pending) + self.saving

    @property
    def blocked(self) -> bool:
        """The store was unreachable at the last try: take no more work for now."""
        return self.failures > 0

    def due_in(self, busy: bool) -> float:
        """Seconds until ``flush`` should run; 0 for now."""
        if not self.pending:
            return 60.0
        if self.failures:
            return max(0.0, self.retry_at - time.monotonic())
        if not busy or len(self.pending) >= self.batch_size:
            return 0.0  # nothing else in hand: save at once (group commit only under load)
        return max(0.0, self.oldest + FLUSH_DELAY - time.monotonic())

    def flush(self) -> None:
        """Try to save every pending outcome; keep those the store could not take now."""
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        self.saving = len(batch)
        try:
            self._save(batch)
        finally:
            self.saving = 0

    def _save(self, batch: list[Finished]) -> None:
        kept: list[Finished] = []
        successes = [i for i in batch if i.outcome.disposition is Disposition.SUCCEEDED]
        for start in range(0, len(successes), self.batch_size):
            kept += self._save_successes(successes[start : start + self.batch_size])
        for item in batch:
            if item.outcome.disposition is not Disposition.SUCCEEDED:
                kept += self._save_other(item)
        self._after_try(kept)

    def _after_try(self, kept: list[Finished]) -> None:
        if not kept:
            self.failures = 0
            return
        delay = RETRY_DELAYS[min(self.failures, len(RETRY_DELAYS) - 1)]
        self.failures += 1
        self.retry_at = time.monotonic() + delay
        self.pending = kept + self.pending
        self.oldest = time.monotonic()
        log = logger.warning if self.failures == 1 else logger.debug
        log(
            "The store is unreachable; %d outcome(s) wait to be saved (next try in %.1fs): %s",
            len(kept),
            delay,
            _names(kept),
        )

    # --- successes ------------------------------------------------------------------------

    def _save_successes(self, batch: list[Finished]) -> list[Finished]:
        """Save ``batch``; return what must wait for the store to be reachable again."""
        try:
            saved = self.backend.complete([(item.job, item.outcome) for item in batch])
        except Exception as e:
            return self._after_error(batch, e, self._save_successes)
        for item in batch:
            self._announce(item, item.job.id in saved)
        return []

    def _after_error(
        self,
        batch: list[Finished],
        error: Exception,
        again: Callable[[list[Finished]], list[Finished]],
    ) -> list[Finished]:
        """Decide what a failed save means: wait for the store, or fail a refused row.

        A lost connection, a lock wait or a deadlock is not the row's fault: the outcome
        waits and is tried again. A row is blamed only when the store says so (a data or
        integrity error), or when it alone keeps failing while the store answers.
        """
        close_old_connections()
        if not self._reachable():
            return batch
        if len(batch) > 1:  # find the row the store refused: save the others alone
            return [kept for item in batch for kept in again([item])]
        [item] = batch
        key = (item.job.key, item.job.delivery)
        self.strikes[key] = self.strikes.get(key, 0) + 1
        if not self.backend.refuses(error) and self.strikes[key] < STRIKES:
            return batch
        self.strikes.pop(key, None)
        self._refused(item, error)
        return []

    def _reachable(self) -> bool:
        try:
            return self.backend.reachable()
        except Exception:
            close_old_connections()
            return False

    # --- failures and retries -------------------------------------------------------------

    def _save_other(self, item: Finished) -> list[Finished]:
        try:
            recorded = self._write_other(item)
        except Exception as e:
            return self._after_error([item], e, lambda items: self._save_other(items[0]))
        self._announce(item, recorded)
        return []

    def _write_other(self, item: Finished) -> bool:
        if item.outcome.disposition in (Disposition.RETRY, Disposition.SNOOZED):
            return self.backend.retry(item.job, item.outcome)
        return self.backend.fail(item.job, item.outcome)

    def _refused(self, item: Finished, error: Exception) -> None:
        """The store refused this outcome: fail the job with the database's message."""
        job = item.job
        message = _plain(
            f"the database refused the outcome of task {job.task_path!r} (job {job.id}): "
            f"{type(error).__name__}: {error}"
        )
        logger.error("Job %s (%s): %s", job.id, job.task_path, message)
        failure = Outcome(
            started_at=item.outcome.started_at,
            finished_at=item.outcome.finished_at,
            error=error_from_text(REFUSED, message),
        )
        refused = Finished(job, item.task, item.result, failure)
        try:
            recorded = self.backend.fail(job, failure)
        except Exception as e:
            close_old_connections()
            self._give_up(refused, e)
            return
        self._announce(refused, recorded)

    def _give_up(self, item: Finished, error: Exception) -> None:
        job = item.job
        reason = _plain(f"its outcome could not be recorded ({type(error).__name__}: {error})")
        logger.error("Job %s (%s): %s; it is put back.", job.id, job.task_path, reason)
        try:
            self.backend.requeue(job, reason, counts_as_attempt=True)
        except Exception:
            close_old_connections()
            logger.exception("Job %s (%s) could not be put back either.", job.id, job.task_path)
        self.done(item)

    # --- after a save -----------------------------------------------------------------------

    def _announce(self, item: Finished, recorded: bool) -> None:
        job, outcome = item.job, item.outcome
        self.strikes.pop((job.key, job.delivery), None)
        if not recorded:
            logger.warning(
                "The outcome of job %s (%s) was not recorded: the job had already ended, or "
                "was delivered again after its lease ran out.",
                job.id,
                job.task_path,
            )
        elif outcome.disposition in (Disposition.SUCCEEDED, Disposition.FAILED):
            self._finished(item)
        else:
            assert outcome.retry_at is not None
            logger.info(
                "Job %s (%s) runs again at %s: %s.",
                job.id,
                job.task_path,
                outcome.retry_at.isoformat(timespec="seconds"),
                "it asked to snooze"
                if outcome.error is None
                else f"{outcome.error.exception_class_path.rpartition('.')[2]}, retried",
            )
            send(
                self.backend,
                task_retried,
                item.result,
                error=outcome.error,
                retry_at=outcome.retry_at,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
            )
        for hook in reversed(self.middleware):
            try:
                hook.after_record(job, item.task, outcome, recorded)
            except Exception:
                logger.exception("after_record of %r failed for job %s", hook, job.id)
        self.done(item)

    def _finished(self, item: Finished) -> None:
        """Send ``task_finished``; for a failure, while its exception is being handled.

        Django's own backends send it inside the ``except`` block, and its receivers log
        the traceback from ``sys.exc_info()``.
        """
        final = self._final(item)
        error = item.outcome.exception
        if error is None or not isinstance(error, Exception):
            send(self.backend, task_finished, final)
        else:
            try:
                raise error
            except Exception:
                send(self.backend, task_finished, final)
        run_hooks(final)

    def _final(self, item: Finished) -> TaskResult:
        outcome = item.outcome
        succeeded = outcome.disposition is Disposition.SUCCEEDED
        errors = list(item.result.errors) + ([outcome.error] if outcome.error else [])
        return self.backend.to_task_result(
            item.job,
            item.task,
            TaskResultStatus.SUCCESSFUL if succeeded else TaskResultStatus.FAILED,
            started_at=item.result.started_at,
            last_attempted_at=outcome.started_at,
            finished_at=outcome.finished_at,
            return_value=outcome.return_value,
            errors=errors,
        )

    def give_up_all(self) -> None:
        """The process is exiting with outcomes unsaved: say which; their jobs go back."""
        with self.lock:
            self._give_up_all()

    def _give_up_all(self) -> None:
        if self.pending:
            logger.error(
                "Could not save %d outcome(s) before exiting; their jobs run again once put "
                "back: %s",
                len(self.pending),
                _names(self.pending),
            )
        for item in self.pending:
            self.done(item)
        self.pending = []


def _names(items: Sequence[Finished]) -> str:
    shown = ", ".join(f"{i.job.id} ({i.job.task_path})" for i in items[:5])
    return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _plain(text: str, limit: int = 2000) -> str:
    """Text any store accepts: no NUL or lone surrogates, bounded length."""
    clean = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return clean[:limit]
