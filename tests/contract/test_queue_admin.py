"""Queue administration on every store: pause (with an end), resume, clear, dedupe."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.tasks import TaskResultStatus
from django.utils import timezone

import conveyor
from conveyor import queues
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.helpers import job, on
from tests.testapp import tasks


def test_workers_take_nothing_from_a_paused_queue_until_it_is_resumed(backend, backend_alias):
    mail = on(tasks.add, backend_alias, queue_name="emails").enqueue(1, 1)
    other = on(tasks.add, backend_alias).enqueue(2, 2)
    queues.pause("emails", backend=backend_alias)
    assert queues.paused(backend=backend_alias) == {"emails": None}
    assert run_until_done(backend_alias) == RunSummary(succeeded=1)
    assert job(other).status == TaskResultStatus.SUCCESSFUL
    assert job(mail).status == TaskResultStatus.READY
    assert queues.resume("emails", backend=backend_alias) is True
    assert queues.resume("emails", backend=backend_alias) is False
    assert run_until_done(backend_alias) == RunSummary(succeeded=1)
    assert job(mail).status == TaskResultStatus.SUCCESSFUL


def test_resuming_a_pause_that_ended_says_it_was_not_paused(backend, backend_alias):
    with store_clock() as clock:
        queues.pause("reports", seconds=60, backend=backend_alias)
        clock.advance(61)
        assert queues.resume("reports", backend=backend_alias) is False


def test_a_pause_for_some_time_ends_by_itself(backend, backend_alias):
    with store_clock() as clock:
        until = queues.pause("reports", seconds=60, backend=backend_alias)
        assert until is not None and until > timezone.now()
        assert set(queues.paused(backend=backend_alias)) == {"reports"}
        clock.advance(61)
        assert queues.paused(backend=backend_alias) == {}
        result = on(tasks.add, backend_alias, queue_name="reports").enqueue(3, 3)
        assert run_until_done(backend_alias) == RunSummary(succeeded=1)
        assert job(result).return_value == 6


def test_clear_deletes_the_jobs_that_have_not_started(backend, backend_alias):
    mail = on(tasks.add, backend_alias, queue_name="emails")
    conveyor.bulk_enqueue(mail, [(i, i) for i in range(5)])
    mail.using(run_after=timezone.now() + timedelta(hours=1)).enqueue(9, 9)
    kept = on(tasks.add, backend_alias).enqueue(1, 1)
    assert queues.clear("emails", backend=backend_alias) == 6
    assert backend.stats().pending == 1
    assert job(kept).status == TaskResultStatus.READY


def test_remove_duplicates_keeps_the_oldest_of_each_call(backend, backend_alias):
    mail = on(tasks.add, backend_alias, queue_name="emails")
    first = mail.enqueue(1, 1)
    mail.enqueue(1, 1)
    mail.enqueue(b=1, a=1)  # another call: keyword arguments
    other = mail.enqueue(2, 1)
    mail.enqueue(2, 1)
    on(tasks.add, backend_alias).enqueue(1, 1)  # another queue: untouched
    assert queues.remove_duplicates("emails", backend=backend_alias) == 2
    assert backend.stats().pending == 4
    assert job(first).status == job(other).status == TaskResultStatus.READY


def test_an_unknown_queue_is_refused_by_name(backend_alias):
    with pytest.raises(queues.UnknownQueue, match="no queue 'nowhere'"):
        queues.pause("nowhere", backend=backend_alias)
    bad = [
        ({"seconds": -1}, "seconds= must be a number more than 0"),
        ({"seconds": "10"}, "seconds= must be a number"),
        ({"seconds": 10**400}, "ten years at most"),
        ({"until": "2030-01-01"}, "until= must be a datetime"),
        ({"until": timezone.now() - timedelta(seconds=1)}, "until= must be later than now"),
    ]
    for given, words in bad:
        with pytest.raises(ValueError, match=words):
            queues.pause("emails", backend=backend_alias, **given)
    assert queues.paused(backend=backend_alias) == {}
