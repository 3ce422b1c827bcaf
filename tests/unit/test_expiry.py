"""The supervisor's expiry: a round about every minute, one batch per tick while behind."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.tasks import task_backends

import conveyor
from conveyor.records import QueueSelector
from conveyor.runtime.retention import EVERY, Expiry
from tests.contract.stores import returned, total
from tests.helpers import on
from tests.testapp import tasks


@pytest.fixture
def memory() -> Any:
    backend = task_backends["memory"]
    backend.clear()  # type: ignore[attr-defined]
    yield backend
    backend.clear()  # type: ignore[attr-defined]


def finish_expired(backend: Any, count: int) -> None:
    conveyor.bulk_enqueue(on(tasks.add, "memory", result_ttl=0), [(n, n) for n in range(count)])
    claimed = backend.claim("w", QueueSelector(), count)
    backend.complete([(job, returned(0)) for job in claimed])


def test_a_round_starts_within_a_minute_and_deletes_one_batch_per_tick(memory, caplog):
    finish_expired(memory, 7)
    expiry = Expiry(memory, batch=3)
    start = expiry.next_run
    assert expiry.tick(start - 0.01) == 0  # not yet
    assert expiry.tick(start) == 3
    assert expiry.tick(start + 1) == 3  # a full batch: another at the next tick
    with caplog.at_level(logging.INFO, logger="conveyor.runtime.retention"):
        assert expiry.tick(start + 2) == 1
    assert "Deleted 7 job(s) kept past their retention." in caplog.text
    assert total(memory) == 0
    assert start + 2 + 0.8 * EVERY <= expiry.next_run <= start + 2 + 1.2 * EVERY
    assert expiry.tick(start + 3) == 0


class Unreachable:
    """A store whose every expiry fails, as one that cannot be reached does."""

    calls = 0

    def expire(self, **kwargs: Any) -> int:
        self.calls += 1
        raise ConnectionError("the store went away")


def test_an_error_is_logged_and_tried_again_next_round(caplog):
    store = Unreachable()
    expiry = Expiry(store, batch=3)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="conveyor.runtime.retention"):
        assert expiry.tick(expiry.next_run) == 0
    assert "Could not delete expired jobs (ConnectionError: the store went away)" in caplog.text
    assert expiry.tick(expiry.next_run - 1) == 0 and store.calls == 1
    expiry.tick(expiry.next_run)
    assert store.calls == 2
