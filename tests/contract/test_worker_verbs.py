"""The verbs a worker drives: claim, complete, fail, retry, leases, stats, prune."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections
from django.tasks import TaskResultStatus, task_backends
from django.tasks.base import TaskError
from django.utils import timezone

from conveyor.backends.database import DatabaseBackend
from conveyor.records import QueueSelector
from tests.helpers import job, on
from tests.testapp import tasks

ALL = QueueSelector()
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom\n")


def with_options(alias: str, **options: object) -> DatabaseBackend:
    """The backend ``alias`` again, with some options changed."""
    params = task_backends[alias]
    return DatabaseBackend(
        alias,
        {
            "QUEUES": sorted(params.queues),
            "OPTIONS": {**params.options, **{k.upper(): v for k, v in options.items()}},
        },
    )


def test_claim_marks_running_and_records_the_worker(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    before = timezone.now()
    [claimed] = backend.claim("worker-a", ALL, 10)

    assert claimed.id == result.id and claimed.attempt == 1
    assert claimed.args == [1, 2] and claimed.task_path == "tests.testapp.tasks.add"
    row = job(result)
    assert row.status == TaskResultStatus.RUNNING
    assert row.lease_owner == "worker-a"
    assert row.lease_expires_at > before
    seen = backend.get_result(result.id)
    assert seen.status == TaskResultStatus.RUNNING
    assert seen.worker_ids == ["worker-a"] and seen.attempts == 1
    assert seen.started_at == seen.last_attempted_at and seen.started_at >= before
    assert backend.claim("worker-b", ALL, 10) == []


def test_higher_priority_first_then_first_in_first_out(backend, backend_alias):
    low = [on(tasks.add, backend_alias, priority=-5).enqueue(i, 0) for i in range(2)]
    mid = [on(tasks.add, backend_alias).enqueue(i, 0) for i in range(3)]
    high = on(tasks.add, backend_alias, priority=50).enqueue(9, 9)

    order = [j.id for j in backend.claim("w", ALL, 2)]
    order += [j.id for j in backend.claim("w", ALL, 10)]
    assert order == [high.id, *[r.id for r in mid], *[r.id for r in low]]


def test_queue_selection(backend, backend_alias):
    email = on(tasks.send_email, backend_alias).enqueue("a@example.com")
    plain = on(tasks.add, backend_alias).enqueue(1, 1)

    only_email = QueueSelector(include=frozenset({"emails"}))
    not_email = QueueSelector(exclude=frozenset({"emails"}))
    assert [j.id for j in backend.claim("w", only_email, 10)] == [email.id]
    assert [j.id for j in backend.claim("w", not_email, 10)] == [plain.id]
    stats = backend.stats()
    assert stats.by_queue["emails"]["running"] == 1
    assert stats.by_queue["default"]["running"] == 1


def test_complete_records_the_return_value(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    finished = timezone.now()
    assert backend.complete(claimed, "w", {"sum": 3, "items": [1, None]}, finished)

    done = backend.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.return_value == {"sum": 3, "items": [1, None]}
    assert done.finished_at == finished
    assert job(result).lease_owner is None


def test_complete_many_saves_each_value(backend, backend_alias):
    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(5)]
    claimed = backend.claim("w", ALL, 5)
    now = timezone.now()
    values = [None, 0, "text", [1, 2], {"a": {"b": True}}]
    saved = backend.complete_many(
        "w",
        [
            (j, v, now + timedelta(seconds=i))
            for i, (j, v) in enumerate(zip(claimed, values, strict=True))
        ],
    )

    assert saved == {r.id for r in results}
    for i, result in enumerate(results):
        done = backend.get_result(result.id)
        assert done.return_value == values[i]
        assert done.finished_at == now + timedelta(seconds=i)


def test_fail_records_the_error(backend, backend_alias):
    result = on(tasks.explode, backend_alias).enqueue("boom")
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.fail(claimed, "w", BOOM, timezone.now())

    failed = backend.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in failed.errors] == ["builtins.ValueError"]
    assert failed.errors[0].exception_class is ValueError
    assert "boom" in failed.errors[0].traceback
    with pytest.raises(ValueError, match="failed"):
        _ = failed.return_value


def test_a_recorded_success_is_never_overwritten(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.complete(claimed, "w", 3, timezone.now())

    assert not backend.complete(claimed, "w", 999, timezone.now())
    assert not backend.fail(claimed, "w", BOOM, timezone.now())
    done = backend.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == 3
    assert done.errors == []


def test_a_stale_failure_is_ignored_but_a_late_success_counts(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [first] = backend.claim("old", ALL, 1)
    assert backend.release("old", "test: lost") == 1
    [second] = backend.claim("new", ALL, 1)
    assert second.attempt == 2

    assert not backend.fail(first, "old", BOOM, timezone.now())  # "old" no longer holds it
    assert backend.get_result(result.id).status == TaskResultStatus.RUNNING
    assert backend.complete(first, "old", 3, timezone.now())  # the work was done
    assert not backend.fail(second, "new", BOOM, timezone.now())
    done = backend.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == 3


def test_retry_makes_the_job_ready_again_later(backend, backend_alias):
    result = on(tasks.explode, backend_alias).enqueue("again")
    [claimed] = backend.claim("w", ALL, 1)
    later = timezone.now() + timedelta(hours=1)
    assert backend.retry(claimed, "w", BOOM, later)

    again = backend.get_result(result.id)
    assert again.status == TaskResultStatus.READY and len(again.errors) == 1
    assert backend.claim("w", ALL, 1) == []
    assert backend.stats().scheduled == 1


def test_release_puts_jobs_back_and_counts_the_attempt(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    backend.claim("w", ALL, 1)
    assert backend.release("w", "the worker process was killed") == 1

    back = backend.get_result(result.id)
    assert back.status == TaskResultStatus.READY and back.attempts == 1
    assert back.errors[0].exception_class_path == "conveyor.exceptions.WorkerLost"
    assert "the worker process was killed" in back.errors[0].traceback
    [again] = backend.claim("w2", ALL, 1)
    assert again.attempt == 2 and list(again.worker_ids) == ["w", "w2"]


def test_a_job_that_keeps_losing_its_worker_is_failed(backend_alias):
    backend = with_options(backend_alias, max_attempts=2)
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    for worker in ("w1", "w2"):
        assert backend.claim(worker, ALL, 1)
        assert backend.release(worker, f"{worker} died")

    failed = backend.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    assert len(failed.errors) == 2
    assert "delivered 2 times" in failed.errors[-1].traceback
    assert backend.claim("w3", ALL, 1) == []


def test_unclaim_undoes_the_delivery(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.unclaim(claimed, "w")

    back = backend.get_result(result.id)
    assert back.status == TaskResultStatus.READY
    assert back.attempts == 0 and back.errors == [] and back.started_at is None
    assert not backend.unclaim(claimed, "w")


def test_heartbeat_keeps_a_lease_and_an_expired_lease_is_recovered(backend_alias):
    backend = with_options(backend_alias, lease=0.3)
    kept = on(tasks.add, backend_alias).enqueue(1, 1)
    lost = on(tasks.add, backend_alias).enqueue(2, 2)
    backend.claim("alive", ALL, 1)
    backend.claim("vanished", ALL, 1)

    for _ in range(3):
        threading.Event().wait(0.15)
        assert backend.heartbeat(["alive"]) == 1
    assert backend.recover_stale() == 1

    assert backend.get_result(kept.id).status == TaskResultStatus.RUNNING
    back = backend.get_result(lost.id)
    assert back.status == TaskResultStatus.READY
    assert "lease expired" in back.errors[0].traceback


def test_concurrent_claims_never_share_a_job(backend, backend_alias):
    on(tasks.add, backend_alias).enqueue(0, 0)
    import conveyor

    conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, i) for i in range(299)])
    taken: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        mine = taken.setdefault(name, [])
        try:
            while batch := backend.claim(name, ALL, 7):
                mine.extend(j.id for j in batch)
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    everything = [i for ids in taken.values() for i in ids]
    assert len(everything) == 300 and len(set(everything)) == 300


def test_stats_and_prune(backend, backend_alias):
    for i in range(3):
        on(tasks.add, backend_alias).enqueue(i, i)
    on(tasks.add, backend_alias, run_after=timezone.now() + timedelta(days=1)).enqueue(0, 0)
    a, b = backend.claim("w", ALL, 2)
    backend.complete(a, "w", 1, timezone.now() - timedelta(days=10))
    backend.fail(b, "w", BOOM, timezone.now())

    stats = backend.stats()
    assert (stats.ready, stats.scheduled, stats.running, stats.successful, stats.failed) == (
        1,
        1,
        0,
        1,
        1,
    )
    assert stats.pending == 2 and stats.finished == 2

    assert backend.prune(timezone.now() - timedelta(days=1)) == 1
    assert backend.stats().successful == 0 and backend.stats().failed == 1


def test_a_requested_stop_never_fails_a_job(backend_alias):
    backend = with_options(backend_alias, max_attempts=1)
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    backend.claim("w", ALL, 1)
    assert backend.release("w", "stopped by the operator", counts_as_attempt=False) == 1
    back = backend.get_result(result.id)
    assert back.status == TaskResultStatus.READY
    assert "stopped by the operator" in back.errors[0].traceback


def test_a_result_stays_readable_after_its_task_is_gone(backend, backend_alias):
    from conveyor.exceptions import TaskNotFound
    from conveyor.models import Job

    result = on(tasks.add, backend_alias).enqueue(1, 2)
    Job.objects.using(backend.database).filter(uuid=result.id).update(
        task_path="tests.testapp.tasks.renamed_long_ago"
    )
    again = backend.get_result(result.id)
    assert again.status == TaskResultStatus.READY
    assert again.task.module_path == "tests.testapp.tasks.renamed_long_ago"
    assert again.args == [1, 2]
    with pytest.raises(TaskNotFound, match="renamed_long_ago"):
        again.task.func()
