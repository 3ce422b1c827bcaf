"""Django integration: system checks, the status and prune commands, autodiscovery."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.tasks import task_backends
from django.utils import timezone

from conveyor.backends.database import DatabaseBackend
from conveyor.checks import check_sqlite_timeout, sqlite_timeout_messages
from conveyor.records import QueueSelector
from tests.contract.stores import returned
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def test_check_names_a_missing_database():
    backend = DatabaseBackend("broken", {"OPTIONS": {"DATABASE": "nowhere"}})
    [error] = backend.check()
    assert error.id == "conveyor.E001"
    assert "'nowhere'" in error.msg


def test_check_passes_for_the_configured_backend():
    assert task_backends["default"].check() == []


def test_check_warns_about_a_short_sqlite_timeout():
    sqlite = "django.db.backends.sqlite3"
    [warning] = sqlite_timeout_messages(
        {"a": {"ENGINE": sqlite, "NAME": "x"}, "b": {"ENGINE": sqlite, "OPTIONS": {"timeout": 20}}}
    )
    assert warning.id == "conveyor.W001"
    assert "DATABASES['a']" in warning.msg
    assert check_sqlite_timeout() == []  # the test settings wait 20 s


def test_status_shows_counts_per_queue():
    tasks.add.enqueue(1, 2)
    tasks.send_email.enqueue("a@example.com")
    task_backends["default"].claim("w", QueueSelector(), 1)
    out = StringIO()
    call_command("conveyor", "status", stdout=out)
    text = out.getvalue()
    assert "Backend 'default'" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows["default"] == ["0", "0", "1", "0", "0"]
    assert rows["emails"] == ["1", "0", "0", "0", "0"]
    assert rows["total"] == ["1", "0", "1", "0", "0"]


def test_prune_deletes_old_finished_jobs():
    backend = task_backends["default"]
    tasks.add.enqueue(1, 2)
    [job] = backend.claim("w", QueueSelector(), 1)
    backend.complete([(job, returned(3, timezone.now() - timedelta(days=30)))])
    out = StringIO()
    call_command("conveyor", "prune", "--older-than", "7", stdout=out)
    assert "Deleted 1 finished job(s) older than 7 day(s)." in out.getvalue()


def test_commands_refuse_bad_arguments():
    with pytest.raises(CommandError, match="--backend 'nope'"):
        call_command("conveyor", "status", "--backend", "nope")
    with pytest.raises(CommandError, match="Unknown queue"):
        call_command("conveyor", "status", "--queue", "nowhere")


def test_tasks_modules_are_discovered():
    import sys

    assert "tests.testapp.tasks" in sys.modules
