"""Unique jobs under a real race: 16 processes enqueue the same key at the same moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connections
from django.tasks import task_backends
from django.utils import timezone

from conveyor.backends.database.models import Job
from tests.conftest import ENGINES
from tests.helpers import ROOT
from tests.services import in_ci

PROCESSES = 16
# Each process connects to every store and warms up, says so, then, each time it is told
# a backend and a task, enqueues the same call on it at once.
ENQUEUER = """
import os, sys
import django
django.setup()
from tests.testapp import tasks

for alias in sys.argv[1:]:
    tasks.sync_account.using(backend=alias, unique_key=["warm-up", os.getpid()]).enqueue(0)
print("ready", flush=True)
for line in sys.stdin:
    alias, name = line.split()
    task = getattr(tasks, name).using(backend=alias)
    print(task.enqueue(42, note=str(os.getpid())).id, flush=True)
"""
STORES = [
    (database, alias) for database, alias in ENGINES.values() if database in settings.DATABASES
]
if in_ci() and len(STORES) < len(ENGINES):
    raise RuntimeError("CI=true but a database server is not configured")


@pytest.fixture
def enqueuers() -> Iterator[list[subprocess.Popen[str]]]:
    """16 processes, each connected to every store and waiting to be told where to enqueue."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["CONVEYOR_TEST_DB_NAMES"] = json.dumps(
        {alias: connections[alias].settings_dict["NAME"] for alias in connections}
    )
    aliases = [alias for _, alias in STORES]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENQUEUER, *aliases],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def race(enqueuers: list[subprocess.Popen[str]], alias: str, task: str) -> str:
    """Have every process enqueue ``task`` on ``alias`` at once; the one id they all got."""
    for proc in enqueuers:  # all are waiting on their input: release them together
        assert proc.stdin is not None
        proc.stdin.write(f"{alias} {task}\n")
        proc.stdin.flush()
    ids = [proc.stdout.readline().strip() for proc in enqueuers if proc.stdout]
    assert len(ids) == PROCESSES and len(set(ids)) == 1, (alias, task, ids)
    result = task_backends[alias].get_result(ids[0])
    assert result.args == [42] and int(result.kwargs["note"]) in {p.pid for p in enqueuers}
    return ids[0]


@pytest.mark.django_db(databases=[database for database, _ in STORES], transaction=True)
def test_sixteen_processes_enqueueing_one_key_store_one_job(enqueuers):
    for database, alias in STORES:
        backend = task_backends[alias]
        race(enqueuers, alias, "sync_account")
        assert backend.stats().pending == PROCESSES + 1, alias  # and each one's warm-up job

        # A holder past its unique_for: all of them try to take its key over at once.
        old = race(enqueuers, alias, "debounced_account")
        Job.objects.using(database).filter(uuid=old).update(
            enqueued_at=timezone.now() - timedelta(minutes=2)
        )
        new = race(enqueuers, alias, "debounced_account")
        assert new != old and backend.stats().pending == PROCESSES + 3, alias
