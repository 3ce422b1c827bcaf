"""Keeping the leases of a supervisor's children: beats, give-backs, put-backs, recovery.

Every third of a lease the supervisor renews exactly the deliveries its children report in
their slots, and beats the registry rows; then it gives back what a live child holds but
never reported. It puts back what a dead child held (counting only what was executing),
retrying while the store cannot be reached, and looks for other machines' expired leases
only after a whole lease of uninterrupted contact with the store.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from django.db import connections

from conveyor import clock
from conveyor.backends.base import Held, StoreBackend
from conveyor.records import CANCELLED_ERROR, Job, Outcome, PutBack, error_from_text
from conveyor.runtime.channel import Delivery, Slots

logger = logging.getLogger(__name__)

BEAT_RETRY = 1.0  # after a failed heartbeat, the next try comes this soon
STUCK = 1.0  # every thread of a child in a task this long: its waiting jobs go back
CANCEL_LOOK = 1.0  # how often running jobs are checked for cancel requests, in seconds


class Tracked(Protocol):
    """A child process as leases see it: the id its jobs are leased under, and its slots."""

    worker_id: str
    slots: Slots


@dataclass(frozen=True, slots=True)
class PendingRelease:
    """Deliveries of a dead child still to be put back (the store was unreachable)."""

    worker_id: str
    reason: str
    executing: frozenset[tuple[int, str]]
    counts: bool
    finished: Mapping[tuple[int, str], Outcome]


class Leases:
    """The lease keeping of one supervisor (``host``) whose children run ``threads`` each."""

    def __init__(self, backend: StoreBackend, host: str, threads: int) -> None:
        self.backend = backend
        self.host = host
        self.threads = threads
        self.lease = backend.conveyor_options.lease
        self.pending: list[PendingRelease] = []
        self.cancel_asked: dict[tuple[int, str], float] = {}  # delivery -> when told to stop
        self.next_cancel_look = 0.0
        # Jobs that ended here (saved for a dead child, or failed for being lost too often):
        # their task_finished and hooks are still to be sent, outside the supervisor.
        self.ended: list[str] = []
        # Runs whose outcome was saved here and that run again: (job id, outcome).
        self.retried: list[tuple[str, Outcome]] = []
        self.contact_since: float | None = None
        self.next_beat = self.next_recover = 0.0

    def connected(self) -> None:
        """The store answered (the supervisor registered itself)."""
        self.contact_since = time.monotonic()

    def tick(self, children: Sequence[Tracked]) -> None:
        """Do whatever is due: beat, unstick, retry put-backs, recover."""
        now = time.monotonic()
        if now >= self.next_beat:
            self.beat(children)
        elif now >= self.next_cancel_look and self.contact_since is not None:
            self.next_cancel_look = now + CANCEL_LOOK
            try:
                self.ask_to_stop(children)
            except Exception as e:
                connections.close_all()
                logger.debug("Could not read cancel requests (%s: %s).", type(e).__name__, e)
        self.unstick(children)
        if self.pending:
            self.retry_releases()
        if now >= self.next_recover and self.in_contact_for(self.lease):
            self.recover()
            self.next_recover = now + self.lease / 2 * random.uniform(0.8, 1.2)

    def release(self, child: Tracked, reason: str, *, counts: bool) -> None:
        """Put back what a child that ended held: only what it was executing counts.

        Successes it had finished but not saved are saved here, and announced.
        """
        executing = frozenset((d.key, d.token) for d in child.slots.read() if d.executing)
        finished = child.slots.finished()
        self._put_back(PendingRelease(child.worker_id, reason, executing, counts, finished))

    def release_stopped(self, child: Tracked, stopped: Mapping[tuple[int, str], Outcome]) -> None:
        """Record the outcomes of the runs a child was stopped for; put back the rest.

        The child's other jobs go back uncounted; what it had finished is saved.
        """
        others = frozenset(
            (d.key, d.token)
            for d in child.slots.read()
            if d.executing and (d.key, d.token) not in stopped
        )
        finished = {**child.slots.finished(), **stopped}
        reason = f"worker process {child.worker_id} was stopped for a task beside it"
        self._put_back(PendingRelease(child.worker_id, reason, others, False, finished))
        for key in stopped:
            self.cancel_asked.pop(key, None)

    def ask_to_stop(self, children: Sequence[Tracked]) -> None:
        """Tell running tasks whose jobs were cancelled; note when, for the grace period."""
        running = {(d.key, d.token): child for child in children for d in child.slots.read()}
        asked = self.backend.cancels(list(running)) if running else set()
        for delivery in asked - set(self.cancel_asked):
            if running[delivery].slots.ask_to_stop(*delivery):
                self.cancel_asked[delivery] = time.monotonic()
                logger.info("Job with key %s was cancelled; asking its task to stop.", delivery[0])
        for delivery in set(self.cancel_asked) - set(running):
            del self.cancel_asked[delivery]  # it ended

    def overdue_cancels(self, child: Tracked, grace: float) -> list[Delivery]:
        """Runs of ``child`` asked to stop more than ``grace`` seconds ago, still running."""
        now = time.monotonic()
        return [
            d
            for d in child.slots.read()
            if d.executing and now - self.cancel_asked.get((d.key, d.token), now) > grace
        ]

    def _put_back(self, pending: PendingRelease) -> bool:
        try:
            put_back = self.backend.release(
                pending.worker_id,
                pending.reason,
                executing=pending.executing,
                counts_as_attempt=pending.counts,
                finished=pending.finished,
            )
        except Exception as e:
            connections.close_all()
            logger.warning(
                "Could not put back the jobs of %s yet (%s: %s); trying again.",
                pending.worker_id,
                type(e).__name__,
                e,
            )
            self.pending.append(pending)
            return False
        log_put_back(put_back, pending.reason, self.backend.conveyor_options.max_attempts)
        self.ended += [p.job.id for p in put_back if p.failed]
        saved = [(p.job, pending.finished[p.job.key, p.job.delivery]) for p in put_back if p.saved]
        self._announce_saved(saved)
        return True

    def _announce_saved(self, saved: Sequence[tuple[Job, Outcome]]) -> None:
        """Log the outcomes saved on behalf of a dead child; note the ended ones."""
        successes = [job for job, outcome in saved if outcome.error is None]
        if successes:
            logger.info(
                "Saved %d outcome(s) a dead worker process had finished: %s",
                len(successes),
                ", ".join(f"{job.id} ({job.task_path})" for job in successes[:5])
                + (f" and {len(successes) - 5} more" if len(successes) > 5 else ""),
            )
        for job, outcome in saved:
            if outcome.error is not None:
                due = outcome.retry_at
                then = f"runs again at {due.isoformat(timespec='seconds')}" if due else "failed"
                then = "was cancelled" if outcome.cancelled else then
                message = outcome.error.traceback.strip()
                logger.error("Job %s (%s) %s: %s", job.id, job.task_path, then, message)
            if outcome.retry_at is None:
                self.ended.append(job.id)
            else:
                self.retried.append((job.id, outcome))

    def retry_releases(self) -> None:
        """Try again the put-backs the store could not take."""
        pending, self.pending = self.pending, []
        for item in pending:
            if not self._put_back(item):
                break
        else:
            return
        self.pending += [p for p in pending if p not in self.pending]

    def beat(self, children: Sequence[Tracked]) -> None:
        """Renew what the children hold, then give back what they hold but never reported."""
        ids = [child.worker_id for child in children]
        try:
            self.backend.heartbeat([self.host, *ids], _deliveries(children))
            if self.contact_since is not None:
                reclaimed = self.backend.reclaim(ids)
        except Exception as e:
            connections.close_all()
            if self.contact_since is not None:
                logger.warning(
                    "Heartbeat failed (%s: %s); retrying every %.0fs.",
                    type(e).__name__,
                    e,
                    BEAT_RETRY,
                )
            self.contact_since = None
            self.next_beat = time.monotonic() + BEAT_RETRY
            return
        for child in children:
            child.slots.stamp()
        try:
            self.ask_to_stop(children)
        except Exception as e:
            connections.close_all()
            logger.warning("Could not read cancel requests (%s: %s).", type(e).__name__, e)
        if self.contact_since is None:
            logger.info("The store answers again; leases renewed.")
            self.contact_since = time.monotonic()
        else:
            for job in reclaimed:
                logger.warning(
                    "Gave back job %s (%s): held under worker %s, which never reported it "
                    "(a claim whose reply was lost).",
                    job.id,
                    job.task_path,
                    job.worker_ids[-1] if job.worker_ids else "?",
                )
        self.next_beat = time.monotonic() + self.lease / 3
        self.retry_releases()

    def unstick(self, children: Sequence[Tracked]) -> None:
        """Give back jobs waiting behind tasks that hold every thread of a child.

        A child's own watchdog does this within milliseconds; it cannot while a task holds
        the interpreter (a long C call), so the supervisor does it after ``STUCK``.
        """
        for child in children:
            revoked = child.slots.revoke_waiting(self.threads, STUCK)
            if not revoked:
                continue
            try:
                jobs = self.backend.give_back(child.worker_id, {(d.key, d.token) for d in revoked})
            except Exception as e:
                connections.close_all()
                logger.warning("Could not give back jobs of %s (%s).", child.worker_id, e)
                continue
            if jobs:
                shown = ", ".join(f"{job.id} ({job.task_path})" for job in jobs[:5])
                logger.info(
                    "Gave back %d job(s) waiting behind a long task in worker %s: %s",
                    len(jobs),
                    child.worker_id,
                    shown,
                )

    def in_contact_for(self, seconds: float) -> bool:
        """Say whether every heartbeat of the last ``seconds`` reached the store.

        After an outage every lease has run out; peers that are alive beat within a third
        of a lease of the store coming back, so recovery waits a whole lease first.
        """
        since = self.contact_since
        return since is not None and time.monotonic() - since >= seconds

    def recover(self) -> None:
        try:
            count = self.backend.recover()
        except Exception as e:
            logger.warning(
                "Could not look for jobs with expired leases (%s: %s).", type(e).__name__, e
            )
            connections.close_all()
            return
        if count:
            logger.warning("Recovered %d job(s) whose worker stopped heartbeating.", count)


def _deliveries(children: Sequence[Tracked]) -> list[Held]:
    """What the children hold, as the store's heartbeat takes it."""
    held: list[Held] = []
    for child in children:
        for d in child.slots.read():
            started = clock.at(d.started) if d.executing else None
            held.append((d.key, d.token, started))
    return held


def log_put_back(put_back: list[PutBack], reason: str, most: int) -> None:
    """One line per job that counted a loss; one line for those given back uncounted."""
    for p in put_back:
        if p.counted and p.failed:
            logger.error(
                "Job %s (%s) failed: %s while it ran; it was lost %d times, the most allowed.",
                p.job.id,
                p.job.task_path,
                reason,
                most,
            )
        elif p.counted:
            logger.warning(
                "Job %s (%s) runs again: %s while it ran.", p.job.id, p.job.task_path, reason
            )
    uncounted = [p.job for p in put_back if not (p.counted or p.saved)]
    if uncounted:
        shown = ", ".join(f"{job.id} ({job.task_path})" for job in uncounted[:5])
        more = f" and {len(uncounted) - 5} more" if len(uncounted) > 5 else ""
        logger.warning(
            "Put back %d job(s), uncounted (%s): %s%s", len(uncounted), reason, shown, more
        )


TIME_LIMIT = "conveyor.exceptions.TimeLimitExceeded"


def limit_outcome(delivery: Delivery, pid: int) -> Outcome:
    """The failure of a run stopped at its time limit (retried after ``on_limit`` if >= 0)."""
    now = clock.now()
    limit = delivery.limit
    message = (
        f"the task ran past its time limit of {limit:g}s; its worker process {pid} was stopped"
    )
    return Outcome(
        started_at=clock.at(delivery.started),
        finished_at=now,
        error=error_from_text(TIME_LIMIT, message),
        retry_at=now + timedelta(seconds=delivery.on_limit) if delivery.on_limit >= 0 else None,
    )


def cancel_outcome(delivery: Delivery, pid: int, grace: float) -> Outcome:
    """The end of a cancelled run its task did not stop within ``grace`` seconds."""
    message = (
        f"the job was cancelled while it ran, and its task did not stop within {grace:g}s; "
        f"its worker process {pid} was stopped"
    )
    return Outcome(
        started_at=clock.at(delivery.started),
        finished_at=clock.now(),
        error=error_from_text(CANCELLED_ERROR, message),
    )
