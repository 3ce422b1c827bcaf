"""Result retention: time to live, keep_last, failures kept; on every store."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from django.tasks import TaskResultStatus, task
from django.tasks.base import TaskError
from django.tasks.exceptions import TaskResultDoesNotExist
from django.utils import timezone

import conveyor
from conveyor.exceptions import ConveyorImproperlyConfigured, InvalidTaskOption
from conveyor.options import FOREVER
from conveyor.records import QueueSelector
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.contract.stores import enqueue, raised, returned, total, with_options
from tests.helpers import job, on
from tests.testapp import tasks

ALL = QueueSelector()
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="boom")


def kept(result) -> bool:  # type: ignore[no-untyped-def]
    try:
        job(result)
    except TaskResultDoesNotExist:
        return False
    return True


def test_a_success_is_deleted_once_its_time_to_live_is_up(backend, backend_alias):
    result = on(tasks.kept_an_hour, backend_alias).enqueue(1)
    pending = on(tasks.kept_an_hour, backend_alias).enqueue(2)
    with store_clock() as clock:
        assert run_until_done(backend_alias, queues="default") == RunSummary(succeeded=2)
        assert backend.expire() == 0
        clock.advance(3500)
        assert backend.expire() == 0 and kept(result)
        clock.advance(200)
        assert backend.expire() == 2
    assert not kept(result) and not kept(pending)
    assert total(backend) == 0


def test_failures_are_kept_unless_told_otherwise(backend, backend_alias):
    success = on(tasks.kept_an_hour, backend_alias).enqueue(1)
    failure = on(tasks.kept_an_hour, backend_alias).enqueue(2, fail=True)
    with store_clock() as clock:
        assert run_until_done(backend_alias) == RunSummary(succeeded=1, failed=1)
        clock.advance(86400 * 365)
        assert backend.expire() == 1
    assert not kept(success)
    assert job(failure).status == TaskResultStatus.FAILED


def test_failed_ttl_expires_failures_and_cancelled_jobs(backend, backend_alias):
    failing = on(tasks.kept_an_hour, backend_alias, failed_ttl=60)
    failure = failing.enqueue(1, fail=True)
    assert run_until_done(backend_alias) == RunSummary(failed=1)
    cancelled = failing.using(run_after=timezone.now() + timedelta(days=1)).enqueue(2)
    assert backend.cancel(cancelled.id)
    with store_clock() as clock:
        clock.advance(59)
        assert backend.expire() == 0
        clock.advance(2)
        assert backend.expire() == 2
    assert not kept(failure) and not kept(cancelled)


def test_a_job_failed_for_lost_deliveries_keeps_its_failed_ttl(backend, backend_alias):
    on(tasks.add, backend_alias, max_attempts=1, failed_ttl=10).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.requeue(claimed, "its process died")
    assert backend.stats().failed == 1
    with store_clock() as clock:
        clock.advance(11)
        assert backend.expire() == 1
    assert total(backend) == 0


def test_backend_defaults_apply_to_tasks_that_set_none(backend, backend_alias):
    configured = with_options(backend_alias, result_ttl=60, failed_ttl=120)
    default = enqueue(configured, tasks.add, 1, 2)
    own = enqueue(configured, tasks.kept_an_hour, 3)  # its own result_ttl wins
    forever = enqueue(configured, on(tasks.add, backend_alias, result_ttl=FOREVER), 4, 5)
    failure = enqueue(configured, tasks.explode, "boom")
    assert run_until_done(backend_alias) == RunSummary(succeeded=3, failed=1)
    with store_clock() as clock:
        clock.advance(61)
        assert backend.expire() == 1 and not kept(default)
        clock.advance(60)
        assert backend.expire() == 1 and not kept(failure)
        clock.advance(3600)
        assert backend.expire() == 1 and not kept(own)
        clock.advance(86400 * 3650)
        assert backend.expire() == 0
    assert job(forever).return_value == 9


def test_the_retention_is_the_one_the_job_was_enqueued_with(backend, backend_alias):
    # Jobs enqueued before a task's retention changed (a deploy) keep what they had.
    before = on(tasks.add, backend_alias).enqueue(1, 1)
    after = on(tasks.add, backend_alias, result_ttl=0).enqueue(2, 2)
    assert run_until_done(backend_alias) == RunSummary(succeeded=2)
    assert backend.expire() == 1
    assert kept(before) and not kept(after)


def test_keep_last_keeps_exactly_the_newest_successes_of_the_task(backend, backend_alias):
    keep_three = on(tasks.keep_three, backend_alias)
    first = [keep_three.enqueue(n) for n in range(5)]
    failure = keep_three.enqueue(5, fail=True)
    other = [on(tasks.add, backend_alias).enqueue(n, n) for n in range(5)]
    assert run_until_done(backend_alias) == RunSummary(succeeded=10, failed=1)
    assert backend.expire() == 2
    assert [kept(r) for r in first] == [False, False, True, True, True]
    assert kept(failure) and all(kept(r) for r in other)

    later = [keep_three.enqueue(n) for n in range(5, 7)]
    assert run_until_done(backend_alias) == RunSummary(succeeded=2)
    assert backend.expire() == 2
    assert [kept(r) for r in [*first, *later]] == [False] * 4 + [True] * 3
    assert kept(failure) and backend.stats().successful == 3 + 5


def test_keep_last_through_one_save_of_many_successes(backend, backend_alias):
    conveyor.bulk_enqueue(on(tasks.keep_three, backend_alias), [(n,) for n in range(7)])
    claimed = backend.claim("w", ALL, 7)
    now = timezone.now()
    finished = [now - timedelta(seconds=10 - n) for n in range(7)]
    saved = backend.complete(
        [(j, returned(j.args[0], at)) for j, at in zip(claimed, finished, strict=True)]
    )
    assert len(saved) == 7
    assert backend.expire(batch=2, pause=0) == 4
    assert sorted(job_value(backend, j.id) for j in claimed if kept_id(backend, j.id)) == [4, 5, 6]


def test_keep_last_zero_keeps_no_success(backend, backend_alias):
    results = [on(tasks.add, backend_alias, keep_last=0).enqueue(n, n) for n in range(3)]
    assert run_until_done(backend_alias) == RunSummary(succeeded=3)
    assert backend.expire() == 3
    assert not any(kept(r) for r in results)


def test_expire_deletes_in_batches_up_to_a_limit(backend, backend_alias):
    conveyor.bulk_enqueue(on(tasks.add, backend_alias, result_ttl=0), [(n, n) for n in range(7)])
    claimed = backend.claim("w", ALL, 7)
    backend.complete([(j, returned(0)) for j in claimed])
    assert backend.expire(batch=2, pause=0, limit=5) == 5
    assert backend.expire(batch=2, pause=0, limit=5) == 2
    assert backend.expire() == 0 and total(backend) == 0


def test_a_failure_through_the_verbs_expires_with_its_job(backend, backend_alias):
    on(tasks.add, backend_alias, failed_ttl=30).enqueue(1, 2)
    [claimed] = backend.claim("w", ALL, 1)
    assert backend.fail(claimed, raised(BOOM))
    with store_clock() as clock:
        assert backend.expire() == 0
        clock.advance(31)
        assert backend.expire() == 1


def kept_id(backend, result_id: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        backend.get_result(result_id)
    except TaskResultDoesNotExist:
        return False
    return True


def job_value(backend, result_id: str):  # type: ignore[no-untyped-def]
    return backend.get_result(result_id).return_value


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"result_ttl": -1}, r"result_ttl must be a number of seconds from 0 to 315360000, or "),
        ({"result_ttl": math.nan}, r"result_ttl must be a number of seconds"),
        ({"failed_ttl": "1 day"}, r"failed_ttl must be a number of seconds.*'1 day'"),
        ({"failed_ttl": True}, r"failed_ttl must be a number of seconds"),
        ({"result_ttl": 11 * 365 * 86400}, r"result_ttl must be a number of seconds"),
        ({"keep_last": -1}, r"keep_last must be a whole number from 0 to 100000, not -1"),
        ({"keep_last": 2.5}, r"keep_last must be a whole number"),
        ({"keep_last": FOREVER}, r"keep_last must be a whole number"),
    ],
)
def test_bad_retention_options_are_refused_naming_the_task_and_option(options, message: str):
    with pytest.raises(
        InvalidTaskOption, match=rf"tests\.contract\.test_retention\.\w+.*{message}"
    ):
        task(**options)(module_level)
    with pytest.raises(InvalidTaskOption, match=message.split(" must")[0]):
        task(module_level).using(**options)


@pytest.mark.parametrize("name", ["RESULT_TTL", "FAILED_TTL"])
@pytest.mark.parametrize("value", [-1, math.inf, math.nan, "60", True, 11 * 365 * 86400])
def test_bad_backend_defaults_are_refused_naming_the_option(name, value):
    with pytest.raises(ConveyorImproperlyConfigured, match=rf"\['{name}'\] must be a number"):
        with_options("memory", **{name: value})


def module_level(x: int) -> int:
    return x
