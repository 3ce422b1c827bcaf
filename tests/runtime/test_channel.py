"""The slots a worker process shares with its supervisor."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import UTC, datetime

import pytest
from django.tasks.base import TaskError

from conveyor.records import Job, Outcome
from conveyor.runtime.channel import OUTCOME_BYTES, Claiming, Slots

STARTED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
FINISHED = datetime(2026, 1, 2, 3, 4, 6, 1, tzinfo=UTC)


def delivery(key: int) -> Job:
    return Job(
        id=f"job-{key}",
        task_path="tests.testapp.tasks.add",
        backend="default",
        queue_name="default",
        priority=0,
        args=[],
        kwargs={},
        attempt=1,
        enqueued_at=STARTED,
        run_after=None,
        started_at=None,
        last_attempted_at=None,
        delivery=f"{key:016x}",
        key=key,
    )


def returned(value: object) -> Outcome:
    return Outcome(started_at=STARTED, finished_at=FINISHED, return_value=value)


def test_a_finished_success_is_readable_by_the_supervisor():
    slots = Slots(multiprocessing.get_context(), 4)
    done = slots.hold(delivery(1))
    running = slots.hold(delivery(2))
    slots.hold(delivery(3))  # claimed ahead
    assert slots.start(done) and slots.start(running)
    slots.finish(done, returned({"rows": [1, 2], "name": "é"}))

    assert slots.finished() == {(1, f"{1:016x}"): returned({"rows": [1, 2], "name": "é"})}


def test_what_cannot_be_copied_is_not_offered():
    slots = Slots(multiprocessing.get_context(), 4)
    jobs = [slots.hold(delivery(key)) for key in (1, 2, 3, 4)]
    for index in jobs:
        assert slots.start(index)
    slots.finish(jobs[0], returned("x" * OUTCOME_BYTES))  # too large for a slot
    slots.finish(jobs[1], returned(float("nan")))  # not JSON
    slots.finish(jobs[2], returned(None))
    error = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError\n")
    slots.finish(jobs[3], Outcome(started_at=STARTED, finished_at=FINISHED, error=error))
    assert slots.finished() == {(3, f"{3:016x}"): returned(None)}


def test_a_reused_slot_forgets_the_last_outcome():
    slots = Slots(multiprocessing.get_context(), 1)
    index = slots.hold(delivery(1))
    assert slots.start(index)
    slots.finish(index, returned(7))
    slots.release(index)
    index = slots.hold(delivery(2))
    assert slots.start(index)
    slots.finish(index)
    assert slots.finished() == {}


def test_a_deadline_before_the_supervisors_next_look_wakes_it():
    read, write = os.pipe()
    os.set_blocking(read, False)
    slots = Slots(multiprocessing.get_context(), 2, wake=write)
    try:
        slots.will_look(time.monotonic() + 60)
        assert slots.start(slots.hold(delivery(1)), limit=0.2)
        assert os.read(read, 16) == b"\0"

        slots.will_look(time.monotonic() + 0.1)
        assert slots.start(slots.hold(delivery(2)), limit=0.2)
        with pytest.raises(BlockingIOError):
            os.read(read, 16)
    finally:
        os.close(read)
        os.close(write)


def test_times_read_back_as_the_project_keeps_them():
    from django.test import override_settings
    from django.utils import timezone

    with override_settings(USE_TZ=False):
        naive = timezone.make_naive(STARTED)
        slots = Slots(multiprocessing.get_context(), 1)
        index = slots.hold(delivery(1))
        assert slots.start(index)
        slots.finish(index, Outcome(started_at=naive, finished_at=naive, return_value=1))
        [outcome] = slots.finished().values()
        assert outcome.started_at == naive and outcome.started_at.tzinfo is None


def test_a_claim_under_way_is_seen_by_siblings_only_while_fresh(monkeypatch):
    claiming = Claiming(multiprocessing.get_context())
    me, sibling = os.getpid(), os.getpid() + 1
    assert not claiming.by_sibling(me)
    claiming.begin(sibling)
    assert claiming.by_sibling(me)
    assert not claiming.by_sibling(sibling)  # its own claim holds nobody back
    claiming.end(me)  # another process's end leaves the mark as it is
    assert claiming.by_sibling(me)
    claiming.end(sibling)
    assert not claiming.by_sibling(me)
    claiming.begin(sibling)  # and never ends: its process died mid-claim
    later = time.monotonic() + Claiming.FRESH
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert not claiming.by_sibling(me)
