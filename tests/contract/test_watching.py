"""What a monitor reads (running jobs, recent failures, pickup latency): the same on every store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.tasks.base import TaskError
from django.utils import timezone

from conveyor.records import Outcome, PickupLatency, QueueSelector
from conveyor.testing import store_clock
from tests.contract.stores import raised, returned
from tests.helpers import on
from tests.testapp import tasks

ALL = QueueSelector()
EMAILS = QueueSelector(include=frozenset({"emails"}))
NOT_EMAILS = QueueSelector(exclude=frozenset({"emails"}))
BOOM = TaskError(
    exception_class_path="builtins.ValueError",
    traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n\n',
)


def _started(backend, jobs, at):
    """Tell the store, as a worker's heartbeat does, that these deliveries started at ``at``."""
    backend.heartbeat(["w"], [(job.key, job.delivery, at) for job in jobs])


# --- running -----------------------------------------------------------------------------


def test_running_lists_the_jobs_workers_hold_longest_running_first(backend, backend_alias):
    for i in range(3):
        on(tasks.add, backend_alias).enqueue(i, 0)
    on(tasks.add, backend_alias).enqueue(9, 9)  # stays ready
    first, second, third = backend.claim("worker-a", ALL, 3)
    now = timezone.now()
    _started(backend, [second], now - timedelta(seconds=30))
    _started(backend, [first], now - timedelta(seconds=5))

    seen = backend.running()
    assert [r.id for r in seen] == [second.id, first.id, third.id]
    assert seen[0].started_at == now - timedelta(seconds=30)
    assert seen[2].started_at is None  # claimed ahead, not started
    assert {r.worker_id for r in seen} == {"worker-a"}
    assert seen[0].task_path == "tests.testapp.tasks.add" and seen[0].queue_name == "default"
    assert seen[0].attempt == 1 and seen[0].enqueued_at == second.enqueued_at
    assert seen[0].progress is None
    assert [r.id for r in backend.running(limit=2)] == [second.id, first.id]
    assert backend.running(limit=0) == []


def test_running_shows_the_progress_a_task_reported(backend, backend_alias):
    on(tasks.add, backend_alias).enqueue(1, 1)
    [job] = backend.claim("w", ALL, 1)
    assert backend.report_progress(job, {"done": 3, "total": 10, "message": "step 3"})
    [seen] = backend.running()
    assert dict(seen.progress) == {"done": 3, "total": 10, "message": "step 3"}


def test_running_jobs_leave_the_list_when_they_end(backend, backend_alias):
    on(tasks.add, backend_alias).enqueue(1, 1)
    on(tasks.add, backend_alias).enqueue(2, 2)
    done, failed = backend.claim("w", ALL, 2)
    backend.complete([(done, returned(2))])
    backend.fail(failed, raised(BOOM))
    assert backend.running() == []


def test_running_keeps_to_the_queues_asked_for(backend, backend_alias):
    email = on(tasks.send_email, backend_alias).enqueue("a@example.com")
    plain = on(tasks.add, backend_alias).enqueue(1, 1)
    backend.claim("w", ALL, 2)
    assert [r.id for r in backend.running(EMAILS)] == [email.id]
    assert [r.id for r in backend.running(NOT_EMAILS)] == [plain.id]
    assert {r.id for r in backend.running(ALL)} == {email.id, plain.id}


# --- recent failures -----------------------------------------------------------------------


def test_recent_failures_newest_first_with_their_error(backend, backend_alias):
    now = timezone.now()
    results = [on(tasks.add, backend_alias).enqueue(i, 0) for i in range(4)]
    old, older_fail, newer_fail, ok = backend.claim("w", ALL, 4)
    backend.fail(old, raised(BOOM, finished_at=now - timedelta(hours=2)))
    backend.fail(older_fail, raised(BOOM, finished_at=now - timedelta(seconds=20)))
    backend.fail(newer_fail, raised(BOOM, finished_at=now - timedelta(seconds=10)))
    backend.complete([(ok, returned(3))])
    cancelled = on(tasks.add, backend_alias).enqueue(5, 5)
    assert backend.cancel(cancelled.id)

    seen = backend.recent_failures(now - timedelta(hours=1))
    assert [f.id for f in seen] == [cancelled.id, newer_fail.id, older_fail.id]
    assert results[0].id not in {f.id for f in seen}  # before ``since``
    last = seen[1]
    assert last.error_class == "builtins.ValueError" and last.message == "ValueError: boom"
    assert last.task_path == "tests.testapp.tasks.add" and last.queue_name == "default"
    assert last.finished_at == now - timedelta(seconds=10) and last.attempt == 1
    assert not last.cancelled
    assert seen[0].cancelled and seen[0].error_class == "conveyor.exceptions.Cancelled"
    assert seen[0].attempt == 0
    assert [f.id for f in backend.recent_failures(now - timedelta(hours=1), limit=2)] == [
        cancelled.id,
        newer_fail.id,
    ]
    assert backend.recent_failures(now + timedelta(seconds=60)) == []


def test_recent_failures_keep_to_the_queues_asked_for(backend, backend_alias):
    since = timezone.now() - timedelta(minutes=1)
    on(tasks.send_email, backend_alias).enqueue("a@example.com")
    on(tasks.add, backend_alias).enqueue(1, 1)
    for job in backend.claim("w", ALL, 2):
        backend.fail(job, raised(BOOM))
    assert [f.queue_name for f in backend.recent_failures(since, EMAILS)] == ["emails"]
    assert [f.queue_name for f in backend.recent_failures(since, NOT_EMAILS)] == ["default"]


def test_a_retry_is_not_a_failure_yet(backend, backend_alias):
    since = timezone.now() - timedelta(minutes=1)
    on(tasks.add, backend_alias).enqueue(1, 1)
    [job] = backend.claim("w", ALL, 1)
    backend.retry(job, raised(BOOM, retry_at=timezone.now() + timedelta(hours=1)))
    assert backend.recent_failures(since) == []


# --- pickup latency --------------------------------------------------------------------------


def _run(backend, job, waited: float, took: float = 0.5) -> None:
    """Complete ``job`` as if its task started ``waited`` seconds after it was enqueued."""
    began = job.enqueued_at + timedelta(seconds=waited)
    finished = began + timedelta(seconds=took)
    backend.complete([(job, Outcome(started_at=began, finished_at=finished, return_value=0))])


def test_pickup_latency_of_finished_and_running_jobs(backend, backend_alias):
    for i in range(21):
        on(tasks.add, backend_alias).enqueue(i, 0)
    jobs = backend.claim("w", ALL, 21)
    since = min(job.enqueued_at for job in jobs) - timedelta(minutes=1)
    for job, waited in zip(jobs[:19], range(1, 20), strict=True):
        _run(backend, job, waited)
    running, not_started = jobs[19:]
    _started(backend, [running], running.enqueued_at + timedelta(seconds=20))

    latency = backend.pickup_latency(since)
    assert latency == PickupLatency(samples=20, p50=10.0, p95=19.0, longest=20.0)
    assert not_started.id not in {r.id for r in backend.running() if r.started_at}


def test_pickup_latency_counts_only_starts_since_then(backend, backend_alias):
    on(tasks.add, backend_alias).enqueue(1, 1)
    on(tasks.add, backend_alias).enqueue(2, 2)
    early, late = backend.claim("w", ALL, 2)
    _run(backend, early, 1.0)
    _run(backend, late, 30.0)
    since = late.enqueued_at + timedelta(seconds=10)
    assert backend.pickup_latency(since) == PickupLatency(
        samples=1, p50=30.0, p95=30.0, longest=30.0
    )
    assert backend.pickup_latency(since + timedelta(hours=1)) == PickupLatency()


def test_pickup_latency_counts_from_when_a_job_fell_due(backend, backend_alias):
    with store_clock() as clock:
        due = timezone.now() + timedelta(seconds=60)
        on(tasks.add, backend_alias, run_after=due).enqueue(1, 1)
        clock.advance(61)
        assert backend.stage() == 1
        [job] = backend.claim("w", ALL, 1)
        began = due + timedelta(seconds=3)
        backend.complete([(job, Outcome(started_at=began, finished_at=began, return_value=2))])
        latency = backend.pickup_latency(due - timedelta(minutes=1))
    assert latency.samples == 1 and latency.p50 == pytest.approx(3.0, abs=0.01)


def test_pickup_latency_is_bounded_and_keeps_to_queues(backend, backend_alias):
    for i in range(5):
        on(tasks.add, backend_alias).enqueue(i, 0)
    on(tasks.send_email, backend_alias).enqueue("a@example.com")
    jobs = backend.claim("w", ALL, 6)
    since = min(job.enqueued_at for job in jobs) - timedelta(minutes=1)
    for job in jobs:
        _run(backend, job, 2.0 if job.queue_name == "emails" else 1.0)
    assert backend.pickup_latency(since, limit=3).samples == 3
    assert backend.pickup_latency(since, EMAILS).p50 == 2.0
    assert backend.pickup_latency(since, NOT_EMAILS) == PickupLatency(
        samples=5, p50=1.0, p95=1.0, longest=1.0
    )


def test_a_failed_run_counts_its_wait_and_a_cancelled_job_none(backend, backend_alias):
    on(tasks.add, backend_alias).enqueue(1, 1)
    cancelled = on(tasks.add, backend_alias).enqueue(2, 2)
    [job] = backend.claim("w", ALL, 1)
    began = job.enqueued_at + timedelta(seconds=4)
    backend.fail(job, Outcome(started_at=began, finished_at=began, error=BOOM))
    assert backend.cancel(cancelled.id)
    latency = backend.pickup_latency(job.enqueued_at - timedelta(minutes=1))
    assert (latency.samples, latency.p50) == (1, 4.0)


@pytest.mark.parametrize("engine", ["memory", "sqlite", "postgres", "mysql"], indirect=True)
def test_pickup_latency_with_use_tz_off(backend, backend_alias):
    from django.test import override_settings

    from conveyor.testing import run_until_done as run

    with override_settings(USE_TZ=False):
        on(tasks.add, backend_alias).enqueue(1, 1)
        run(backend_alias)
        since = timezone.now() - timedelta(minutes=5)
        assert backend.pickup_latency(since).samples == 1


# --- throughput ---------------------------------------------------------------------------


def _ended(backend, backend_alias, count, at, *, failing=0, task=tasks.add):
    """``count`` jobs of ``task`` that end at ``at``, the first ``failing`` of them failed."""
    for i in range(count):
        on(task, backend_alias).enqueue(*((i, 0) if task is tasks.add else (f"{i}@example.com",)))
    for i, job in enumerate(backend.claim("w", ALL, count)):
        if i < failing:
            backend.fail(job, raised(BOOM, finished_at=at))
        else:
            backend.complete([(job, returned(0, finished_at=at))])


def test_throughput_counts_the_jobs_that_ended_per_interval(backend, backend_alias):
    minute = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=5)
    _ended(backend, backend_alias, 3, minute + timedelta(seconds=10), failing=1)
    _ended(backend, backend_alias, 2, minute + timedelta(seconds=50))
    _ended(backend, backend_alias, 4, minute + timedelta(minutes=2, seconds=1), failing=4)
    _ended(backend, backend_alias, 5, minute - timedelta(minutes=10))  # before ``since``

    seen = backend.throughput(minute - timedelta(minutes=1), step=60)
    assert [(t.start, t.succeeded, t.failed) for t in seen] == [
        (minute, 4, 1),
        (minute + timedelta(minutes=2), 0, 4),  # the minute between had none: left out
    ]
    assert seen[0].start.utcoffset() == timedelta(0)  # aware

    halves = backend.throughput(minute, step=30)
    assert [(t.start - minute, t.succeeded + t.failed) for t in halves] == [
        (timedelta(0), 3),
        (timedelta(seconds=30), 2),
        (timedelta(minutes=2), 4),
    ]


def test_throughput_counts_cancelled_jobs_as_failed_and_keeps_to_queues(backend, backend_alias):
    now = timezone.now()
    cancelled = on(tasks.add, backend_alias).enqueue(1, 1)
    assert backend.cancel(cancelled.id)
    _ended(backend, backend_alias, 2, now, task=tasks.send_email)
    on(tasks.add, backend_alias).enqueue(5, 5)  # ready: not counted

    since = now - timedelta(minutes=5)
    every = backend.throughput(since, step=3600)
    assert sum(t.failed for t in every) == 1 and sum(t.succeeded for t in every) == 2
    assert sum(t.succeeded for t in backend.throughput(since, queues=EMAILS)) == 2
    assert sum(t.succeeded + t.failed for t in backend.throughput(since, queues=NOT_EMAILS)) == 1
    assert backend.throughput(now + timedelta(minutes=5)) == []


def test_throughput_intervals_split_at_their_boundaries(backend, backend_alias):
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    _ended(backend, backend_alias, 1, midnight - timedelta(seconds=2))
    _ended(backend, backend_alias, 1, midnight + timedelta(seconds=1))
    since = midnight - timedelta(hours=1)
    for step in (86400, 3600, 60):
        seen = backend.throughput(since, step=step)
        assert [t.succeeded for t in seen] == [1, 1], step
        assert seen[1].start == midnight


def test_throughput_intervals_are_real_time_with_local_times_stored(
    backend, backend_alias, settings
):
    # Without USE_TZ, times are stored in local time: India is 5 h 30 min ahead of UTC.
    settings.USE_TZ, settings.TIME_ZONE = False, "Asia/Kolkata"
    local = datetime(2030, 5, 6, 10, 20)  # 04:50 UTC
    _ended(backend, backend_alias, 1, local)
    _ended(backend, backend_alias, 1, local + timedelta(minutes=20))  # 05:10 UTC
    seen = backend.throughput(local - timedelta(hours=2), step=3600)
    assert [(t.start, t.succeeded) for t in seen] == [
        (datetime(2030, 5, 6, 4, tzinfo=UTC), 1),
        (datetime(2030, 5, 6, 5, tzinfo=UTC), 1),
    ]
