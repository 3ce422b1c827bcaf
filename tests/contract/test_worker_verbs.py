"""The verbs a worker drives, through the store contract only: the same on every store."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections
from django.tasks import TaskResultStatus
from django.tasks.base import TaskError
from django.utils import timezone

from conveyor.records import Outcome, QueueSelector, WorkerInfo
from conveyor.testing import store_clock
from tests.contract.stores import enqueue, raised, returned, total, with_options
from tests.helpers import on
from tests.testapp import tasks

ALL = QueueSelector()
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom\n")


def test_claim_marks_running_and_records_the_worker(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    before = timezone.now()
    [claimed] = backend.claim("worker-a", ALL, 10)

    assert claimed.id == result.id and claimed.attempt == 1 and claimed.delivery
    assert claimed.args == [1, 2] and claimed.task_path == "tests.testapp.tasks.add"
    seen = backend.get_result(result.id)
    assert seen.status == TaskResultStatus.RUNNING
    assert seen.worker_ids == ["worker-a"] and seen.attempts == 1
    assert seen.started_at is None  # written when the task really starts
    assert backend.claim("worker-b", ALL, 10) == []
    began = timezone.now()
    outcome = Outcome(started_at=began, finished_at=timezone.now(), return_value=3)
    backend.complete([(claimed, outcome)])
    done = backend.get_result(result.id)
    assert done.started_at == done.last_attempted_at == began >= before


def test_each_delivery_gets_its_own_token(backend, backend_alias):
    on(tasks.add, backend_alias).enqueue(1, 2)
    [first] = backend.claim("w1", ALL, 1)
    assert backend.requeue(first, "test: lost")
    [second] = backend.claim("w2", ALL, 1)
    assert second.id == first.id and second.delivery != first.delivery


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
    report = on(tasks.add, backend_alias, queue_name="reports", priority=9).enqueue(2, 2)

    only_email = QueueSelector(include=frozenset({"emails"}))
    not_email = QueueSelector(exclude=frozenset({"emails"}))
    assert [j.id for j in backend.claim("w", only_email, 10)] == [email.id]
    assert [j.id for j in backend.claim("w", not_email, 10)] == [report.id, plain.id]
    stats = backend.stats()
    assert stats.by_queue["emails"]["running"] == 1
    assert stats.by_queue["default"]["running"] == 1
    assert backend.stats(only_email).running == 1


def test_several_named_queues_are_merged_in_priority_order(backend, backend_alias):
    a = on(tasks.add, backend_alias, queue_name="reports", priority=1).enqueue(1, 1)
    b = on(tasks.send_email, backend_alias, priority=5).enqueue("b@example.com")
    c = on(tasks.add, backend_alias, queue_name="reports").enqueue(2, 2)
    on(tasks.add, backend_alias, priority=99).enqueue(3, 3)  # 'default': not served

    both = QueueSelector(include=frozenset({"emails", "reports"}))
    assert [j.id for j in backend.claim("w", both, 2)] == [b.id, a.id]
    assert [j.id for j in backend.claim("w", both, 10)] == [c.id]


def test_complete_records_the_return_value(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    finished = timezone.now()
    value = {"sum": 3, "items": [1, None]}
    assert backend.complete([(claimed, returned(value, finished))]) == {result.id}

    done = backend.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.return_value == {"sum": 3, "items": [1, None]}
    assert done.finished_at == finished
    assert backend.stats().running == 0


def test_complete_saves_each_value(backend, backend_alias):
    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(5)]
    claimed = backend.claim("w", ALL, 5)
    now = timezone.now()
    values = [None, 0, "text", [1, 2], {"a": {"b": True}}]
    saved = backend.complete(
        [
            (j, returned(v, now + timedelta(seconds=i)))
            for i, (j, v) in enumerate(zip(claimed, values, strict=True))
        ]
    )

    assert saved == {r.id for r in results}
    for i, result in enumerate(results):
        done = backend.get_result(result.id)
        assert done.return_value == values[i]
        assert done.finished_at == now + timedelta(seconds=i)


def test_fail_records_the_error(backend, backend_alias):
    result = on(tasks.explode, backend_alias).enqueue("boom")
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.fail(claimed, raised(BOOM, timezone.now()))

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
    assert backend.complete([(claimed, returned(3, timezone.now()))]) == {result.id}

    assert not backend.fail(claimed, raised(BOOM, timezone.now()))
    assert not backend.retry(claimed, raised(BOOM, retry_at=timezone.now()))
    assert not backend.requeue(claimed, "late")
    assert backend.unclaim([claimed]) == 0
    done = backend.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == 3
    assert done.errors == []


def test_an_outcome_sent_again_by_the_same_delivery_counts_as_saved(backend, backend_alias):
    # A commit whose reply was lost is sent again: it is recognised, not "someone else's".
    ok = on(tasks.add, backend_alias).enqueue(1, 2)
    bad = on(tasks.add, backend_alias).enqueue(2, 2)
    first, second = backend.claim("w", ALL, 2)
    finished = timezone.now()
    assert backend.complete([(first, returned(3, finished))]) == {ok.id}
    assert backend.complete([(first, returned(3, finished))]) == {ok.id}
    assert backend.fail(second, raised(BOOM, finished))
    assert backend.fail(second, raised(BOOM, finished))
    assert len(backend.get_result(bad.id).errors) == 1


def test_a_stale_delivery_is_refused_but_a_late_success_counts(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [first] = backend.claim("old", ALL, 1)
    assert backend.requeue(first, "test: lost")
    [second] = backend.claim("new", ALL, 1)
    assert second.attempt == 2

    assert not backend.fail(first, raised(BOOM, timezone.now()))  # an older delivery
    assert not backend.requeue(first, "stale")
    assert backend.unclaim([first]) == 0
    assert backend.get_result(result.id).status == TaskResultStatus.RUNNING
    # The work was done: a late success counts, and the first success wins.
    assert backend.complete([(first, returned(3, timezone.now()))]) == {result.id}
    assert backend.complete([(second, returned(4, timezone.now()))]) == set()
    assert not backend.fail(second, raised(BOOM, timezone.now()))
    done = backend.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == 3


def test_retry_schedules_the_job_again(backend, backend_alias):
    result = on(tasks.explode, backend_alias).enqueue("again")
    [claimed] = backend.claim("w", ALL, 1)
    # The delay after the run ended (here an hour), counted on the store's clock: a worker
    # whose clock is off by minutes does not move the retry.
    ended = timezone.now() - timedelta(minutes=5)
    failed = raised(BOOM, finished_at=ended, retry_at=ended + timedelta(hours=1))
    before = timezone.now() - timedelta(milliseconds=1)  # SQLite keeps milliseconds
    assert backend.retry(claimed, failed)

    again = backend.get_result(result.id)
    assert again.status == TaskResultStatus.READY and len(again.errors) == 1
    assert backend.claim("w", ALL, 1) == []
    assert backend.stats().scheduled == 1
    due = backend.next_due(ALL)
    assert before + timedelta(hours=1) <= due <= timezone.now() + timedelta(hours=1)
    assert again.task.run_after == due  # the result says when it runs next


def test_a_retry_due_now_is_ready_at_once(backend, backend_alias):
    result = on(tasks.explode, backend_alias).enqueue("again")
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.retry(claimed, raised(BOOM, retry_at=timezone.now() - timedelta(seconds=1)))
    [again] = backend.claim("w", ALL, 1)
    assert again.id == result.id and again.attempt == 2


def test_scheduled_jobs_wait_until_staged_when_due(backend, backend_alias):
    soon = timezone.now() + timedelta(seconds=30)
    result = on(tasks.add, backend_alias, run_after=soon).enqueue(1, 1)
    on(tasks.add, backend_alias, run_after=timezone.now() + timedelta(days=1)).enqueue(2, 2)

    assert backend.stats().scheduled == 2
    assert backend.next_due(ALL) == soon
    assert backend.stage() == 0
    assert backend.claim("w", ALL, 5) == []
    with store_clock() as clock:
        clock.advance(30.05)
        assert backend.stage() == 1
        assert backend.stage() == 0  # idempotent
        [claimed] = backend.claim("w", ALL, 5)
    assert claimed.id == result.id
    assert backend.stats().scheduled == 1


def test_requeue_counts_the_loss_and_the_job_runs_again(backend, backend_alias):
    result = on(tasks.add, backend_alias).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.requeue(claimed, "the worker process was killed")

    back = backend.get_result(result.id)
    assert back.status == TaskResultStatus.READY and back.attempts == 1
    assert back.errors[0].exception_class_path == "conveyor.exceptions.WorkerLost"
    assert "the worker process was killed" in back.errors[0].traceback
    [again] = backend.claim("w2", ALL, 1)
    assert again.attempt == 2 and list(again.worker_ids) == ["w", "w2"]


def test_release_counts_only_what_was_executing(backend, backend_alias):
    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(4)]
    running, ahead, behind = backend.claim("gone", ALL, 3)
    backend.claim("other", ALL, 1)
    put_back = backend.release(
        "gone", "its process was killed", executing={(running.key, running.delivery)}
    )

    assert {(p.job.id, p.counted, p.failed) for p in put_back} == {
        (running.id, True, False),
        (ahead.id, False, False),
        (behind.id, False, False),
    }
    lost = backend.get_result(running.id)
    assert lost.status == TaskResultStatus.READY and lost.attempts == 1
    assert "its process was killed" in lost.errors[0].traceback
    for job in (ahead, behind):
        back = backend.get_result(job.id)
        assert back.attempts == 0 and back.errors == []
    assert backend.get_result(results[3].id).status == TaskResultStatus.RUNNING
    # Uncounted put-backs keep their place in line.
    assert [j.id for j in backend.claim("next", ALL, 3)] == [r.id for r in results[:3]]


def test_release_saves_what_the_process_had_finished(backend, backend_alias):
    add = on(tasks.add, backend_alias)
    results = [add.enqueue(i, i) for i in range(3)]
    done, running, ahead = backend.claim("gone", ALL, 3)
    refused = enqueue(backend, on(tasks.noop, backend_alias))
    [unsavable] = backend.claim("gone", ALL, 1)
    finished = {
        (done.key, done.delivery): returned(0),
        # Not JSON, as a refused value would be: the job goes back and runs again.
        (unsavable.key, unsavable.delivery): returned(float("nan")),
    }
    put_back = backend.release(
        "gone",
        "its process was killed",
        executing={(running.key, running.delivery)},
        finished=finished,
    )

    assert {(p.job.id, p.counted, p.saved) for p in put_back} == {
        (done.id, False, True),
        (running.id, True, False),
        (ahead.id, False, False),
        (refused.id, False, False),
    }
    saved = backend.get_result(done.id)
    assert saved.status == TaskResultStatus.SUCCESSFUL and saved.return_value == 0
    assert saved.attempts == 1 and saved.errors == []
    assert backend.get_result(refused.id).status == TaskResultStatus.READY
    assert backend.get_result(results[2].id).attempts == 0
    # A second release (the first one's reply was lost) changes nothing.
    assert backend.release("gone", "again", finished=finished) == []


def test_a_stopped_worker_s_running_job_is_not_counted(backend_alias):
    backend = with_options(backend_alias, max_attempts=1)
    result = enqueue(backend, on(tasks.add, backend_alias), 1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    executing = {(claimed.key, claimed.delivery)}
    [put_back] = backend.release("w", "stopped", executing=executing, counts_as_attempt=False)
    assert not put_back.counted and not put_back.failed
    assert backend.get_result(result.id).status == TaskResultStatus.READY


def test_heartbeat_renews_the_deliveries_named_and_marks_started(backend_alias):
    backend = with_options(backend_alias, lease=30)
    task = on(tasks.add, backend_alias)
    named = enqueue(backend, task, 1, 1)
    unnamed = enqueue(backend, task, 2, 2)
    first, second = backend.claim("w", ALL, 2)
    assert backend.get_result(named.id).started_at is None  # not started yet
    began = timezone.now()

    with store_clock() as clock:
        clock.advance(25)
        assert backend.heartbeat(["w"], [(first.key, first.delivery, began)]) == 1
        assert backend.heartbeat(["w"], [(second.key, "0" * 16, None)]) == 0  # a stale token
        clock.advance(10)
        assert backend.reclaim(["w"]) == []  # expired, but not for a whole lease yet
        clock.advance(30)
        # Unrenewed for two leases while its worker lives: given back uncounted.
        [reclaimed] = backend.reclaim(["w"])
        assert reclaimed.id == unnamed.id
        assert backend.reclaim(["w"]) == []
    again = backend.get_result(unnamed.id)
    assert again.status == TaskResultStatus.READY and again.attempts == 0
    running = backend.get_result(named.id)
    assert running.status == TaskResultStatus.RUNNING
    assert running.started_at == began and running.last_attempted_at == began


def test_a_job_that_keeps_losing_its_worker_is_failed(backend_alias):
    backend = with_options(backend_alias, max_attempts=2)
    result = enqueue(backend, on(tasks.add, backend_alias), 1, 2)
    for worker in ("w1", "w2"):
        [claimed] = backend.claim(worker, ALL, 1)
        assert backend.requeue(claimed, f"{worker} died")

    failed = backend.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    assert len(failed.errors) == 2
    assert "lost 2 times" in failed.errors[-1].traceback
    assert backend.claim("w3", ALL, 1) == []


def test_a_requested_stop_never_fails_a_job(backend_alias):
    backend = with_options(backend_alias, max_attempts=1)
    result = enqueue(backend, on(tasks.add, backend_alias), 1, 2)
    for _ in range(3):
        [claimed] = backend.claim("w", ALL, 1)
        assert backend.requeue(claimed, "stopped by the operator", counts_as_attempt=False)
    back = backend.get_result(result.id)
    assert back.status == TaskResultStatus.READY
    assert "stopped by the operator" in back.errors[0].traceback


def test_unclaim_undoes_the_delivery_and_keeps_the_place_in_line(backend, backend_alias):
    first = on(tasks.add, backend_alias).enqueue(1, 2)
    on(tasks.add, backend_alias).enqueue(2, 2)
    claimed = backend.claim("w", ALL, 2)
    newer = on(tasks.add, backend_alias).enqueue(3, 3)
    assert backend.unclaim(claimed) == 2

    back = backend.get_result(first.id)
    assert back.status == TaskResultStatus.READY
    assert back.attempts == 0 and back.errors == [] and back.started_at is None
    assert backend.unclaim(claimed) == 0
    order = [j.id for j in backend.claim("w", ALL, 3)]
    assert order[0] == first.id and order[-1] == newer.id


def test_heartbeat_keeps_a_lease_and_an_expired_lease_is_recovered(backend_alias):
    backend = with_options(backend_alias, lease=0.3)
    task = on(tasks.add, backend_alias)
    kept = enqueue(backend, task, 1, 1)
    lost = enqueue(backend, task, 2, 2)
    [alive] = backend.claim("alive", ALL, 1)
    backend.claim("vanished", ALL, 1)

    with store_clock() as clock:
        clock.advance(0.4)
        assert backend.heartbeat(["alive"], [(alive.key, alive.delivery, None)]) == 1
        assert backend.recover() == 1
    assert backend.recover() == 0

    assert backend.get_result(kept.id).status == TaskResultStatus.RUNNING
    back = backend.get_result(lost.id)
    assert back.status == TaskResultStatus.READY
    assert "lease expired" in back.errors[0].traceback


def test_only_expired_leases_are_recovered(backend_alias):
    # A stopped worker's jobs wait out their lease (by the store's clock) before recovery.
    backend = with_options(backend_alias, lease=0.3)
    result = enqueue(backend, on(tasks.add, backend_alias), 1, 1)
    backend.register_worker(_info(backend_alias, "w"))
    backend.claim("w", ALL, 1)
    backend.end_worker("w", "stopped")
    assert backend.recover() == 0
    assert backend.get_result(result.id).status == TaskResultStatus.RUNNING
    with store_clock() as clock:
        clock.advance(0.4)
        assert backend.recover() == 1
    assert backend.get_result(result.id).status == TaskResultStatus.READY


def test_the_workers_registry(backend, backend_alias):
    backend.register_worker(_info(backend_alias, "sup", kind="supervisor"))
    backend.register_worker(_info(backend_alias, "sup:1", supervisor="sup"))
    backend.heartbeat(["sup", "sup:1"], [])
    alive = {w.id: w for w in backend.workers()}
    assert set(alive) == {"sup", "sup:1"}
    assert alive["sup:1"].supervisor == "sup" and alive["sup:1"].last_beat_at is not None
    backend.end_worker("sup:1", "killed by signal SIGKILL")
    assert [w.id for w in backend.workers()] == ["sup"]
    [ended] = [w for w in backend.workers(alive=False) if w.id == "sup:1"]
    assert ended.stopped_at is not None and ended.ended == "killed by signal SIGKILL"


def test_cancel_a_job_that_has_not_started(backend, backend_alias):
    pending = on(tasks.add, backend_alias).enqueue(1, 1)
    later = on(tasks.add, backend_alias, run_after=timezone.now() + timedelta(hours=1)).enqueue(2)
    running = on(tasks.add, backend_alias).enqueue(3, 3)
    assert backend.cancel(pending.id) and backend.cancel(later.id)
    [claimed] = backend.claim("w", ALL, 5)
    assert claimed.id == running.id
    assert not backend.cancel(running.id)

    cancelled = backend.get_result(pending.id)
    assert cancelled.status == TaskResultStatus.FAILED and cancelled.finished_at
    assert cancelled.errors[-1].exception_class_path == "conveyor.exceptions.Cancelled"
    assert not backend.cancel(pending.id)
    assert backend.stats().failed == 2


def test_concurrent_claims_never_share_a_job(backend, backend_alias):
    import conveyor

    conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, i) for i in range(300)])
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
    backend.complete([(a, returned(1, timezone.now() - timedelta(days=10)))])
    backend.fail(b, raised(BOOM, timezone.now()))

    stats = backend.stats()
    counts = (stats.ready, stats.scheduled, stats.running, stats.successful, stats.failed)
    assert counts == (1, 1, 0, 1, 1)
    assert stats.pending == 2 and stats.finished == 2
    recent = backend.stats(finished_since=timezone.now() - timedelta(days=1))
    assert recent.successful == 0 and recent.failed == 1 and recent.pending == 2

    assert backend.prune(timezone.now() - timedelta(days=1)) == 1
    assert backend.stats().successful == 0 and backend.stats().failed == 1


def test_prune_works_in_batches(backend, backend_alias):
    import conveyor

    conveyor.bulk_enqueue(on(tasks.add, backend_alias), [(i, i) for i in range(7)])
    claimed = backend.claim("w", ALL, 7)
    old = timezone.now() - timedelta(days=3)
    backend.complete([(job, returned(None, old)) for job in claimed])
    assert backend.prune(timezone.now(), batch=2, pause=0) == 7
    assert total(backend) == 0


def _info(alias: str, worker_id: str, kind: str = "process", supervisor: str | None = None):  # type: ignore[no-untyped-def]
    return WorkerInfo(
        id=worker_id,
        backend=alias,
        kind=kind,
        host="test-host",
        pid=1,
        supervisor=supervisor,
        started_at=timezone.now(),
    )


def test_a_claim_leases_by_the_store_clock_of_the_moment(backend, backend_alias):
    # What an earlier claim saw of the store's clock never carries over to a later one.
    task = on(tasks.add, backend_alias)
    task.enqueue(1, 1)
    backend.claim("real", ALL, 1)
    with store_clock() as clock:
        clock.advance(3600)
        ahead = task.enqueue(2, 2)
        assert [job.id for job in backend.claim("ahead", ALL, 1)] == [ahead.id]
        assert backend.reclaim(["ahead"]) == []  # leased from this clock's now
    later = task.enqueue(3, 3)
    assert [job.id for job in backend.claim("later", ALL, 1)] == [later.id]
    with store_clock() as clock:
        clock.advance(backend.conveyor_options.lease * 1.5)
        assert backend.recover() == 2  # "real" and "later"; "ahead" holds its lease an hour
    assert backend.get_result(later.id).status == TaskResultStatus.READY
    assert backend.get_result(ahead.id).status == TaskResultStatus.RUNNING


def test_a_result_read_from_a_row_with_deferred_fields(backend, backend_alias):
    if backend_alias == "memory":
        pytest.skip("the memory store keeps no model rows")
    from conveyor.backends.database.models import Job

    result = on(tasks.add, backend_alias).enqueue(2, 3)
    [claimed] = backend.claim("w", ALL, 1)
    outcome = Outcome(started_at=timezone.now(), finished_at=timezone.now(), return_value=5)
    backend.complete([(claimed, outcome)])
    row = Job.objects.using(backend.store.using).defer("return_value", "args").get(uuid=result.id)
    read = backend.row_to_result(row)
    assert read.return_value == 5 and read.args == [2, 3]
