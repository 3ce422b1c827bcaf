"""The in-process store's deliveries: outcomes saved, jobs given and put back, leases."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from conveyor import clock
from conveyor.backends.base import Held, StoreBackend
from conveyor.options import Retention, trims
from conveyor.records import PENDING_STATES, Job, Outcome, PutBack, State, Success

if TYPE_CHECKING:
    from conveyor.backends.memory.tables import Tables

OPEN = (*PENDING_STATES, State.RUNNING)
EXPIRED = "its lease expired without a heartbeat (the worker or its machine stopped)"


class MemoryDeliveries(StoreBackend):
    """End each delivery of a claimed job: save its outcome, give it back or put it back."""

    if TYPE_CHECKING:  # what ``MemoryBackend`` has
        _tables: Tables
        lease: timedelta
        max_attempts: int

    # --- outcomes -----------------------------------------------------------------------

    def complete(self, successes: Sequence[Success]) -> set[str]:
        # As stored JSON reads back; done first, so a value that is not JSON changes nothing.
        values = [json.loads(json.dumps(o.return_value, allow_nan=False)) for _, o in successes]
        with self._tables.lock:
            for (job, outcome), value in zip(successes, values, strict=True):
                row = self._tables.by_key.get(job.key)
                if row is not None and row.state in OPEN:
                    row.succeed(job.delivery, value, outcome)
            saved = {
                job.id
                for job, _ in successes
                if self._tables.saved_by(job.key, job.delivery, State.SUCCEEDED)
            }
            self._let_go(successes, saved)
            return saved

    def _let_go(self, successes: Sequence[Success], saved: set[str]) -> None:
        """Expire the successes of ``keep_last`` tasks that the saved ones pushed out."""
        for (task_path, keep), window in trims(successes, saved).items():
            self._tables.trim(task_path, keep, window)

    def fail(self, job: Job, outcome: Outcome) -> bool:
        state = State.CANCELLED if outcome.cancelled else State.FAILED
        expires = Retention.from_stored(job.options).expires(outcome.finished_at, succeeded=False)
        return self._end_delivery(
            job,
            outcome,
            (state,),
            state=state,
            finished_at=outcome.finished_at,
            expires_at=expires,
        )

    def retry(self, job: Job, outcome: Outcome) -> bool:
        assert outcome.retry_at is not None
        run_after = clock.now() + max(outcome.retry_at - outcome.finished_at, timedelta(0))
        state = State.READY if run_after <= clock.now() else State.SCHEDULED
        done = (State.SCHEDULED, State.READY)
        return self._end_delivery(
            job, outcome, done, state=state, available_at=run_after, run_after=run_after
        )

    def _end_delivery(
        self, job: Job, outcome: Outcome, done: tuple[State, ...], **changes: Any
    ) -> bool:
        """Close the delivery ``job`` if it still holds the job; True also if it already did."""
        with self._tables.lock:
            row = self._tables.delivered(job.key, job.delivery)
            if row is None:
                return self._tables.saved_by(job.key, job.delivery, *done)
            row.end(outcome.started_at, outcome.error, **changes)
            return True

    # --- giving back and putting back ---------------------------------------------------

    def unclaim(self, jobs: Sequence[Job]) -> int:
        undone = 0
        with self._tables.lock:
            for job in jobs:
                if (row := self._tables.delivered(job.key, job.delivery)) is None:
                    continue
                row.state, row.attempts = State.READY, row.attempts - 1
                row.worker_ids = list(job.worker_ids[:-1])
                row.lease_owner = row.lease_expires_at = None
                undone += 1
        return undone

    def requeue(self, job: Job, reason: str, *, counts_as_attempt: bool = True) -> bool:
        with self._tables.lock:
            row = self._tables.delivered(job.key, job.delivery)
            if row is None:
                return False
            row.put_back(reason, counts_as_attempt, self.max_attempts)
            return True

    def release(
        self,
        worker_id: str,
        reason: str,
        *,
        executing: Collection[tuple[int, str]] = (),
        counts_as_attempt: bool = True,
        finished: Mapping[tuple[int, str], Outcome] | None = None,
    ) -> list[PutBack]:
        done = self._save_finished(worker_id, finished or {})
        with self._tables.lock:
            for row in sorted(self._tables.held(worker_id), key=lambda r: r.seq):
                job = row.record(self.alias)
                if (row.seq, row.delivery) in executing:
                    failed = row.put_back(reason, counts_as_attempt, self.max_attempts)
                    done.append(PutBack(job=job, counted=counts_as_attempt, failed=failed))
                else:
                    row.give_back()
                    done.append(PutBack(job=job, counted=False, failed=False))
        return done

    def _save_finished(
        self, worker_id: str, finished: Mapping[tuple[int, str], Outcome]
    ) -> list[PutBack]:
        with self._tables.lock:
            jobs = [row.record(self.alias) for row in self._tables.held(worker_id, finished)]
        saved = [job for job in jobs if self._save_one(job, finished[job.key, job.delivery])]
        return [PutBack(job=job, counted=False, failed=False, saved=True) for job in saved]

    def _save_one(self, job: Job, outcome: Outcome) -> bool:
        """Save a finished outcome as its delivery would have; False if the store refuses it."""
        if outcome.error is not None:
            return self.retry(job, outcome) if outcome.retry_at else self.fail(job, outcome)
        try:
            return job.id in self.complete([(job, outcome)])
        except (TypeError, ValueError):
            return False  # a value the store refuses: the job runs again, and fails then

    def give_back(self, worker_id: str, deliveries: Collection[tuple[int, str]]) -> list[Job]:
        with self._tables.lock:
            held = self._tables.held(worker_id, deliveries)
            jobs = [row.record(self.alias) for row in held]
            for row in held:
                row.give_back()
        return jobs

    def reclaim(self, worker_ids: Sequence[str]) -> list[Job]:
        now, owners = clock.now(), set(worker_ids)
        with self._tables.lock:
            lapsed = [
                r
                for r in self._tables.rows(State.RUNNING)
                if r.lease_owner in owners
                and r.lease_expires_at
                and r.lease_expires_at < now - self.lease
            ]
            jobs = [row.record(self.alias) for row in lapsed]
            for row in lapsed:
                row.give_back()
        return jobs

    # --- leases -------------------------------------------------------------------------

    def heartbeat(self, worker_ids: Sequence[str], deliveries: Sequence[Held] = ()) -> int:
        now, renewed = clock.now(), 0
        with self._tables.lock:
            for key, token, started in deliveries:
                if (row := self._tables.delivered(key, token)) is None:
                    continue
                row.renew(now + self.lease, started)
                renewed += 1
            self._tables.beat(worker_ids, now)
        return renewed

    def recover(self) -> int:
        now = clock.now()
        with self._tables.lock:
            stale = [
                row
                for row in self._tables.rows(State.RUNNING)
                if row.lease_expires_at is not None
                and row.lease_expires_at < now
                and not self._tables.beating(row.lease_owner, now, self.lease)
            ]
            for row in stale:
                row.put_back(EXPIRED, True, self.max_attempts)
            return len(stale)
