"""A monitor whose database cannot be reached says so, with the driver's own error."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.db import connections
from rich.console import Console

from conveyor.backends.database import DatabaseBackend
from conveyor.monitor import Watcher
from conveyor.monitoring import render
from conveyor.records import QueueSelector

# An alias per engine, pointing where no database answers.
NOWHERE = {
    "sqlite": ("default", {"NAME": "/nonexistent-directory/conveyor.sqlite3"}),
    "postgres": ("postgres", {"PORT": 1}),
    "mysql": ("mysql", {"PORT": 1}),
}


@pytest.fixture(params=list(NOWHERE))
def nowhere(request: pytest.FixtureRequest, django_db_blocker: Any) -> Iterator[DatabaseBackend]:
    base, changes = NOWHERE[request.param]
    if base not in settings.DATABASES:
        pytest.skip(f"no {request.param} server on this machine")
    alias = f"nowhere_{request.param}"
    connections.settings[alias] = {**copy.deepcopy(connections.settings[base]), **changes}
    backend = DatabaseBackend(alias, {"QUEUES": ["default"], "OPTIONS": {"DATABASE": alias}})
    try:
        with django_db_blocker.unblock():
            yield backend
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]


def test_a_database_that_cannot_be_reached_is_said_so_and_tried_again(nowhere):
    watcher = Watcher(nowhere, QueueSelector(), 2.0)
    first = watcher.look()
    assert first.error.startswith("OperationalError: "), first.error
    assert first.taken_at is None
    out = StringIO()
    Console(file=out, width=200).print(render(first))
    text = out.getvalue()
    assert "Cannot reach the store: OperationalError" in text and "nothing read yet" in text
    assert "Traceback" not in text
    again = watcher.look()  # a new try, on a new connection, fails the same way
    assert again.error == first.error and again.checked_at > first.checked_at
