"""Unique jobs on every store: which calls are the same, in which states, for how long."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.tasks import TaskResultStatus, task
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask
from django.tasks.signals import task_enqueued
from django.utils import timezone

import conveyor
from conveyor.exceptions import InvalidTaskOption
from conveyor.records import QueueSelector
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.contract.stores import raised, returned, total
from tests.helpers import job, on
from tests.testapp import tasks

EVERYTHING = QueueSelector()
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom")


# --- which calls are the same ----------------------------------------------------------------


def test_the_same_arguments_return_the_stored_job(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias)
    first = task.enqueue(1, 2)
    again = task.enqueue(1, 2)
    other = task.enqueue(2, 1)
    named = task.enqueue(1, b=2)  # the key is the call as made: keywords differ

    assert again.id == first.id and again.args == [1, 2]
    assert again.status == TaskResultStatus.READY
    assert len({first.id, other.id, named.id}) == 3
    assert total(backend) == 3


def test_keyword_order_and_tuples_do_not_matter(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias)
    first = task.enqueue(a=[1, {"x": 1, "y": 2}], b=2)
    assert task.enqueue(b=2, a=([1, {"y": 2, "x": 1}])).id == first.id
    assert task.enqueue(b=2, a=(1, {"y": 2, "x": 1})).id == first.id
    assert total(backend) == 1


def test_a_key_function_picks_what_makes_calls_the_same(backend, backend_alias):
    task = on(tasks.sync_account, backend_alias)
    first = task.enqueue(7, note="first")
    again = task.enqueue(7, note="second")
    other = task.enqueue(8, note="first")

    assert again.id == first.id and job(again).kwargs == {"note": "first"}
    assert other.id != first.id
    assert total(backend) == 2


def test_a_key_given_per_call(backend, backend_alias):
    task = on(tasks.add, backend_alias)
    first = task.using(unique_key="nightly").enqueue(1, 2)
    again = task.using(unique_key="nightly").enqueue(3, 4)
    other = task.using(unique_key=["nightly", 2]).enqueue(1, 2)
    plain = task.enqueue(1, 2)

    assert again.id == first.id
    assert len({first.id, other.id, plain.id}) == 3
    assert total(backend) == 3


def test_keys_are_per_task_and_unique_false_turns_a_key_off(backend, backend_alias):
    account = on(tasks.sync_account, backend_alias).enqueue(7)
    refresh = on(tasks.refresh_account, backend_alias).enqueue(7)  # same key, other task
    off = on(tasks.sync_account, backend_alias).using(unique=False)

    assert refresh.id != account.id
    assert off.enqueue(7).id != off.enqueue(7).id
    assert total(backend) == 4


def test_only_a_new_job_is_announced(backend_alias):
    seen: list[str] = []

    def note(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(task_result.id)

    task_enqueued.connect(note)
    try:
        first = on(tasks.unique_add, backend_alias).enqueue(1, 2)
        on(tasks.unique_add, backend_alias).enqueue(1, 2)
    finally:
        task_enqueued.disconnect(note)
    assert seen == [first.id]


# --- in which states ------------------------------------------------------------------------


def test_active_by_default_a_running_job_counts_until_it_ends(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias)
    first = task.enqueue(1, 2)
    [running] = backend.claim("w", EVERYTHING, 10)
    during = task.enqueue(1, 2)
    assert during.id == first.id and during.status == TaskResultStatus.RUNNING

    assert backend.complete([(running, returned(3))]) == {first.id}
    after = task.enqueue(1, 2)
    assert after.id != first.id and after.status == TaskResultStatus.READY
    assert total(backend) == 2


def test_a_retried_job_keeps_its_key(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias).using(retries=3)
    first = task.enqueue(1, 2)
    [running] = backend.claim("w", EVERYTHING, 10)
    later = timezone.now() + timedelta(hours=1)
    assert backend.retry(running, raised(BOOM, retry_at=later))
    assert job(first).status == TaskResultStatus.READY  # scheduled for its retry
    assert task.enqueue(1, 2).id == first.id
    assert total(backend) == 1


def test_queued_only_a_started_job_no_longer_counts(backend, backend_alias):
    task = on(tasks.refresh_account, backend_alias)
    first = task.enqueue(7)
    assert task.enqueue(7).id == first.id
    [running] = backend.claim("w", EVERYTHING, 10)
    second = task.enqueue(7)
    assert second.id != first.id

    # Put back in line, the first does not take its key back: the second holds it.
    assert backend.unclaim([running]) == 1
    assert task.enqueue(7).id == second.id
    assert total(backend) == 2


def test_successful_a_job_that_succeeded_still_counts(backend, backend_alias):
    task = on(tasks.hourly_report, backend_alias)
    first = task.enqueue("sales")
    assert run_until_done(backend_alias) == RunSummary(succeeded=1)

    again = task.enqueue("sales")
    assert again.id == first.id
    assert again.status == TaskResultStatus.SUCCESSFUL and again.return_value == "report sales"
    assert total(backend) == 1


@pytest.mark.parametrize("states", ["queued", "active", "successful"])
def test_failed_and_cancelled_jobs_never_count(backend, backend_alias, states):
    task = on(tasks.unique_add, backend_alias).using(unique_states=states)
    failed = task.enqueue(1, 2)
    [running] = backend.claim("w", EVERYTHING, 10)
    assert backend.fail(running, raised(BOOM))
    cancelled = task.enqueue(1, 2)
    assert cancelled.id != failed.id
    assert backend.cancel(cancelled.id)
    third = task.enqueue(1, 2)
    assert third.id not in {failed.id, cancelled.id}
    assert total(backend) == 3


def test_a_job_lost_too_often_lets_go_of_its_key(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias).using(max_attempts=1)
    first = task.enqueue(1, 2)
    [running] = backend.claim("w", EVERYTHING, 10)
    assert backend.requeue(running, "its process died")
    assert job(first).status == TaskResultStatus.FAILED
    assert task.enqueue(1, 2).id != first.id


def test_a_job_put_back_after_a_lost_delivery_keeps_its_key(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias)
    first = task.enqueue(1, 2)
    [running] = backend.claim("w", EVERYTHING, 10)
    put_back = backend.release("w", "stopped", executing=[(running.key, running.delivery)])
    assert [p.counted for p in put_back] == [True]
    assert task.enqueue(1, 2).id == first.id


# --- for how long -------------------------------------------------------------------------


def test_unique_for_lets_a_new_job_in_once_the_period_is_over(backend, backend_alias):
    task = on(tasks.debounced, backend_alias)
    with store_clock() as clock:
        first = task.enqueue("x")
        clock.advance(59)
        assert task.enqueue("x").id == first.id
        clock.advance(2)
        second = task.enqueue("x")  # the first is still queued, but too old to count
        assert second.id != first.id
        assert task.enqueue("x").id == second.id
    assert total(backend) == 2
    assert job(first).status == TaskResultStatus.READY


def test_unique_for_after_success(backend, backend_alias):
    task = on(tasks.hourly_report, backend_alias)
    with store_clock() as clock:
        first = task.enqueue("sales")
        run_until_done(backend_alias)
        clock.advance(3000)
        assert task.enqueue("sales").id == first.id
        clock.advance(601)
        assert task.enqueue("sales").id != first.id
    assert total(backend) == 2


# --- in bulk, and in transactions ---------------------------------------------------------


def test_bulk_enqueue_with_repeats_in_the_batch_and_in_the_store(backend, backend_alias):
    task = on(tasks.unique_add, backend_alias)
    stored = task.enqueue(5, 5)
    results = conveyor.bulk_enqueue(task, [(1, 2), (3, 4), (1, 2), (5, 5), (3, 4)])

    ids = [r.id for r in results]
    assert ids[0] == ids[2] and ids[1] == ids[4] and ids[3] == stored.id
    assert len(set(ids)) == 3
    assert total(backend) == 3


def test_a_unique_job_enqueued_in_a_rolled_back_transaction_leaves_its_key_free(
    backend, backend_alias, engine
):
    if engine == "memory":
        pytest.skip("transactional enqueue is a property of the database stores")
    task = on(tasks.unique_add, backend_alias)
    with pytest.raises(RuntimeError), transaction.atomic(using=backend.database):
        doomed = task.enqueue(1, 2)
        assert task.enqueue(1, 2).id == doomed.id
        raise RuntimeError("roll back")
    with transaction.atomic(using=backend.database):
        kept = task.enqueue(1, 2)
        assert task.enqueue(1, 2).id == kept.id
    assert kept.id != doomed.id
    assert total(backend) == 1


# --- bad keys: a clear error, nothing stored ----------------------------------------------


@pytest.mark.parametrize(
    ("task", "said"),
    [
        (tasks.bad_key, r"unique_key function raised LookupError: no account given"),
        (tasks.unjson_key, r"unique_key function returned .* not a JSON value"),
    ],
)
def test_a_key_function_that_fails_is_refused_at_enqueue(backend, backend_alias, task, said):
    with pytest.raises(InvalidTaskOption, match=said) as info:
        on(task, backend_alias).enqueue(7)
    assert "tests.testapp.tasks." in str(info.value) and "Nothing was stored" in str(info.value)
    assert total(backend) == 0


def test_a_failing_key_in_a_batch_stores_none_of_it(backend, backend_alias):
    def key(account: int) -> int:
        if account == 3:
            raise ValueError("three")
        return account

    task = on(tasks.bad_key, backend_alias).using(unique_key=key)
    with pytest.raises(InvalidTaskOption, match="raised ValueError: three"):
        conveyor.bulk_enqueue(task, [(1,), (2,), (3,)])
    assert total(backend) == 0


BAD_OPTIONS = [
    ({"unique": "yes"}, "unique must be True or False"),
    ({"unique": True, "unique_states": "running"}, "unique_states must be one of"),
    ({"unique": True, "unique_for": 0}, "unique_for must be a number"),
    ({"unique": True, "unique_for": "1h"}, "unique_for must be a number"),
    ({"unique_for": 60}, "unique_for only apply to unique jobs"),
    ({"unique_states": "queued"}, "unique_states only apply to unique jobs"),
    ({"unique_key": {1, 2}}, "unique_key must be a function of the task's arguments or a JSON"),
    ({"unique_key": float("nan")}, "unique_key must be"),
]


@pytest.mark.parametrize(("options", "said"), BAD_OPTIONS, ids=repr)
def test_bad_unique_options_are_refused_at_decoration_and_in_using(options, said):
    def chore(n: int) -> int:
        return n

    with pytest.raises(InvalidTask, match=said) as info:
        task(**options)(chore)
    assert "chore" in str(info.value)
    with pytest.raises(InvalidTaskOption, match=said):
        tasks.add.using(**options)
