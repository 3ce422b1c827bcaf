"""Enqueueing through django.tasks, the same on every store."""

from __future__ import annotations

from datetime import UTC, timedelta
from zoneinfo import ZoneInfo

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.tasks import TaskResultStatus
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone

import conveyor
from conveyor.backends.database import DatabaseBackend
from conveyor.exceptions import InvalidTaskArguments
from tests.contract.stores import total
from tests.helpers import on
from tests.testapp import tasks


def count(backend) -> int:  # type: ignore[no-untyped-def]
    return total(backend)


def test_enqueue_stores_a_ready_result(backend, backend_alias):
    before = timezone.now()
    result = on(tasks.add, backend_alias).enqueue(2, b=3)

    assert result.status == TaskResultStatus.READY
    assert result.backend == backend_alias
    assert result.args == [2] and result.kwargs == {"b": 3}
    assert before <= result.enqueued_at <= timezone.now()
    assert result.started_at is None and result.finished_at is None
    assert result.errors == [] and result.worker_ids == []
    with pytest.raises(ValueError, match="not finished"):
        _ = result.return_value

    again = on(tasks.add, backend_alias).get_result(result.id)
    assert again.id == result.id and again.status == TaskResultStatus.READY
    assert again.args == [2] and again.kwargs == {"b": 3}
    assert again.enqueued_at == result.enqueued_at
    assert again.task.func is tasks.add.func and again.task.backend == backend_alias


def test_async_twins(backend_alias):
    async def go():  # type: ignore[no-untyped-def]
        result = await on(tasks.add, backend_alias).aenqueue(1, 1)
        return result, await on(tasks.add, backend_alias).aget_result(result.id)

    # From the main thread, so thread-sensitive database work stays on this thread.
    result, again = async_to_sync(go)()
    assert again.id == result.id and again.status == TaskResultStatus.READY


def test_enqueued_signal_is_sent_by_the_backend_class(backend, backend_alias):
    seen = []

    def receiver(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((sender, task_result.id))

    task_enqueued.connect(receiver)
    try:
        result = on(tasks.noop, backend_alias).enqueue()
    finally:
        task_enqueued.disconnect(receiver)
    assert seen == [(type(backend), result.id)]


def test_unknown_result_id(backend):
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("00000000-0000-0000-0000-000000000000")
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("not-a-uuid")


def test_unknown_queue_is_refused_with_nothing_stored(backend, backend_alias):
    with pytest.raises(InvalidTask, match="Queue 'nowhere' is not valid"):
        on(tasks.add, backend_alias, queue_name="nowhere").enqueue(1, 2)
    assert count(backend) == 0


def test_arguments_that_are_not_json_name_the_task_and_argument(backend, backend_alias):
    with pytest.raises(InvalidTaskArguments) as info:
        on(tasks.add, backend_alias).enqueue(1, b=object())
    message = str(info.value)
    assert "'tests.testapp.tasks.add'" in message
    assert "keyword argument 'b'" in message and "object" in message
    assert "nothing was stored" in message
    with pytest.raises(InvalidTaskArguments, match="positional argument 0"):
        on(tasks.add, backend_alias).enqueue(timezone.now(), 1)
    with pytest.raises(InvalidTaskArguments, match="positional argument 1"):
        on(tasks.add, backend_alias).enqueue(1, float("nan"))
    assert count(backend) == 0


def test_bulk_enqueue_stores_all_in_order(backend, backend_alias):
    task = on(tasks.add, backend_alias)
    results = conveyor.bulk_enqueue(task, [(i, i) for i in range(1200)] + [conveyor.call(1, b=2)])

    assert len(results) == 1201
    assert count(backend) == 1201
    assert results[-1].kwargs == {"b": 2}
    assert len({r.id for r in results}) == 1201
    claimed = backend.claim("w", _everything(), 5)
    assert [j.args for j in claimed] == [[i, i] for i in range(5)]


def test_bulk_enqueue_is_all_or_nothing(backend, backend_alias):
    task = on(tasks.add, backend_alias)
    with pytest.raises(InvalidTaskArguments, match="positional argument 0"):
        conveyor.bulk_enqueue(task, [(1, 2), (object(), 2), (3, 4)])
    with pytest.raises(InvalidTask, match="takes each call as"):
        conveyor.bulk_enqueue(task, [(1, 2), [3, 4]])
    assert count(backend) == 0


def test_bulk_enqueue_needs_a_conveyor_backend():
    with pytest.raises(InvalidTask, match="cannot enqueue in bulk"):
        conveyor.bulk_enqueue(tasks.add.using(backend="immediate"), [(1, 2)])


def test_enqueue_in_a_rolled_back_transaction_leaves_nothing(backend, backend_alias, engine):
    if engine == "memory":
        pytest.skip("transactional enqueue is a property of the database stores")
    db = backend.database
    with pytest.raises(RuntimeError), transaction.atomic(using=db):
        doomed = on(tasks.add, backend_alias).enqueue(1, 1)
        assert backend.get_result(doomed.id).status == TaskResultStatus.READY
        raise RuntimeError("roll back")
    with transaction.atomic(using=db):
        kept = on(tasks.add, backend_alias).enqueue(2, 2)

    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result(doomed.id)
    assert backend.get_result(kept.id).status == TaskResultStatus.READY
    assert [j.id for j in backend.claim("w", _everything(), 10)] == [kept.id]


def test_run_after_is_kept_and_honoured(backend, backend_alias):
    later = timezone.now() + timedelta(hours=1)
    deferred = on(tasks.add, backend_alias, run_after=later).enqueue(1, 1)
    due = on(tasks.add, backend_alias, run_after=timezone.now() - timedelta(seconds=1)).enqueue(
        2, 2
    )

    assert backend.get_result(deferred.id).task.run_after == later
    assert [j.id for j in backend.claim("w", _everything(), 10)] == [due.id]
    stats = backend.stats()
    assert stats.scheduled == 1 and stats.running == 1 and stats.ready == 0


def test_each_result_keeps_its_own_run_after(backend, backend_alias):
    """Two jobs due at the same moment, written in different zones, read back apart."""
    at = (timezone.now() + timedelta(days=1)).replace(microsecond=0)
    paris = on(tasks.add, backend_alias, run_after=at.astimezone(ZoneInfo("Europe/Paris")))
    in_utc = on(tasks.add, backend_alias, run_after=at.astimezone(UTC))
    first, second = paris.enqueue(1, 2), in_utc.enqueue(1, 2)
    backend.get_result(first.id)
    read = backend.get_result(second.id).task.run_after
    assert read == at and read.utcoffset() == timedelta(0)


def test_naive_run_after_is_refused(backend_alias):
    with pytest.raises(InvalidTask, match="aware datetime"):
        on(tasks.add, backend_alias, run_after=timezone.now().replace(tzinfo=None))


def test_unknown_option_names_it():
    from conveyor.exceptions import ConveyorImproperlyConfigured

    params = {
        "BACKEND": "conveyor.backends.database.DatabaseBackend",
        "OPTIONS": {"LEASE": 5, "LEASSE": 3},
    }
    with pytest.raises(ConveyorImproperlyConfigured, match=r"unknown option.*LEASSE"):
        DatabaseBackend("x", params)
    params["OPTIONS"] = {"LEASE": -1}
    with pytest.raises(ConveyorImproperlyConfigured, match=r"'LEASE'.*must be a number"):
        DatabaseBackend("x", params)
    params["OPTIONS"] = {"BATCH_SIZE": 0}
    with pytest.raises(ConveyorImproperlyConfigured, match="'BATCH_SIZE'"):
        DatabaseBackend("x", params)


def _everything():  # type: ignore[no-untyped-def]
    from conveyor.records import QueueSelector

    return QueueSelector()
