"""The dashboard's pages, read with Django's test client, on every backend."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.db import connections
from django.tasks import task_backends
from django.tasks.base import TaskError
from django.test import Client
from django.utils import timezone

from conveyor.records import QueueSelector, WorkerInfo
from tests.contract.stores import raised, returned
from tests.dashboard.conftest import LIVE, OVERVIEW, SCHEDULES, WORKERS
from tests.helpers import on
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(databases="__all__")

BOOM = TaskError(
    exception_class_path="builtins.ValueError",
    traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n',
)


def board_data(response) -> dict:
    """The numbers the page's script draws."""
    found = re.search(
        r'<script id="board-data" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert found, "the page carries no chart data"
    return json.loads(found.group(1))


def busy(alias: str) -> dict[str, str]:
    """A backend with a job of each kind a page shows; their ids by what they are."""
    backend = task_backends[alias]
    backend.register_worker(
        WorkerInfo(id="host-1:42", backend=alias, kind="process", host="host-1", pid=42)
    )
    ran = on(tasks.add, alias).enqueue(1, 2)
    broke = on(tasks.explode, alias).enqueue("boom")
    on(tasks.send_email, alias).enqueue("a@example.com")  # ready, in "emails"
    on(tasks.add, alias, run_after=timezone.now() + timedelta(hours=1)).enqueue(0, 0)
    claimed = {job.id: job for job in backend.claim("host-1:42", QueueSelector(), 2)}
    backend.complete([(claimed[ran.id], returned(3))])
    backend.fail(claimed[broke.id], raised(BOOM))
    running = on(tasks.noop, alias).enqueue()
    [job] = backend.claim("host-1:42", QueueSelector(include=frozenset({"default"})), 1)
    assert job.id == running.id
    backend.heartbeat(["host-1:42"], [(job.key, job.delivery, timezone.now())])
    backend.report_progress(job, {"done": 3, "total": 4, "message": "copying"})
    return {"failed": broke.id, "running": running.id}


@pytest.fixture(params=["memory", "default", "postgres", "mysql"])
def alias(request: pytest.FixtureRequest) -> str:
    from django.conf import settings

    from tests.services import in_ci

    name: str = request.param
    if name not in settings.TASKS:
        if in_ci():
            pytest.fail(f"CI=true but the {name} server is not configured")
        pytest.skip(f"no {name} server on this machine")
    return name


def test_the_overview_shows_depths_running_jobs_failures_and_throughput(operator, alias):
    ids = busy(alias)
    response = operator.get(OVERVIEW, {"backend": alias})
    assert response.status_code == 200
    page = response.content.decode()
    emails = re.search(r'<tr data-queue="emails">(.*?)</tr>', page, re.S)
    assert emails and re.findall(r'class="num">(\d+)<', emails.group(1))[:3] == ["1", "0", "0"]
    default = re.search(r'<tr data-queue="default">(.*?)</tr>', page, re.S)
    assert default and re.findall(r'class="num">(\d+)<', default.group(1))[:3] == ["0", "1", "1"]
    running = re.search(rf'<tr data-job="{ids["running"]}">(.*?)</tr>', page, re.S)
    assert running and "tests.testapp.tasks.noop" in running.group(1)
    assert "3/4 75% copying" in running.group(1) and "Cancel" in running.group(1)
    failed = re.search(rf'<tr data-job="{ids["failed"]}">(.*?)</tr>', page, re.S)
    assert failed and "ValueError: boom" in failed.group(1) and "Retry" in failed.group(1)
    data = board_data(response)
    assert data["ok"] and data["depth"] == {"ready": 1, "scheduled": 1, "running": 1}
    assert sum(p["succeeded"] for p in data["throughput"]) == 1
    assert sum(p["failed"] for p in data["throughput"]) == 1
    assert len(data["throughput"]) == 60  # one bar a minute, the empty ones too


def test_the_live_fragment_is_the_panels_alone(operator, alias):
    busy(alias)
    response = operator.get(LIVE, {"backend": alias})
    assert response.status_code == 200
    page = response.content.decode()
    assert "<html" not in page and 'data-queue="emails"' in page
    assert board_data(response)["depth"]["ready"] == 1
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_the_workers_page_lists_workers_with_their_running_jobs(operator, alias):
    busy(alias)
    backend = task_backends[alias]
    backend.register_worker(
        WorkerInfo(id="host-2:7", backend=alias, kind="process", host="host-2", pid=7)
    )
    backend.end_worker("host-2:7", "exit code 3")
    page = operator.get(WORKERS, {"backend": alias}).content.decode()
    live = re.search(r'<tr data-worker="host-1:42">(.*?)</tr>', page, re.S)
    assert live and "online" in live.group(1)
    assert re.findall(r'class="num">(\d+)<', live.group(1)) == ["42", "1", "1"]
    gone = re.search(r'<tr data-worker="host-2:7">(.*?)</tr>', page, re.S)
    assert gone and "stopped" in gone.group(1) and "exit code 3" in gone.group(1)


def test_the_schedules_page_lists_schedules(operator, alias):
    from conveyor import schedules

    schedules.create("nightly", "tests.testapp.tasks.noop", cron="30 2 * * *", backend=alias)
    schedules.pause("nightly", backend=alias)
    page = operator.get(SCHEDULES, {"backend": alias}).content.decode()
    row = re.search(r'<tr data-schedule="nightly">(.*?)</tr>', page, re.S)
    assert row and "cron 30 2 * * *" in row.group(1) and "paused" in row.group(1)
    assert "Resume" in row.group(1) and "Run now" in row.group(1)


def test_names_are_escaped(operator):
    alias = "memory"
    task_backends[alias].register_worker(
        WorkerInfo(id="<script>x</script>", backend=alias, kind="process", host="h", pid=1)
    )
    page = operator.get(WORKERS, {"backend": alias}).content.decode()
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


# --- who may look --------------------------------------------------------------------------


def test_a_visitor_is_sent_to_log_in():
    response = Client().get(OVERVIEW)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Client().get(LIVE).status_code == 302


def test_a_user_who_is_not_staff_is_refused(make_client):
    client = make_client("change_job", staff=False)
    for page in (OVERVIEW, LIVE, WORKERS, SCHEDULES):
        assert client.get(page).status_code == 403


def test_a_staff_user_without_permissions_sees_no_buttons(make_client):
    busy("memory")
    page = make_client().get(OVERVIEW, {"backend": "memory"}).content.decode()
    assert "ValueError: boom" in page
    assert "Retry" not in page and "Cancel" not in page and "Pause" not in page


def test_an_unknown_or_inline_backend_is_not_found(operator):
    assert operator.get(OVERVIEW, {"backend": "nope"}).status_code == 404
    assert operator.get(OVERVIEW, {"backend": "eager"}).status_code == 404
    assert operator.get(OVERVIEW, {"backend": "immediate"}).status_code == 404


def test_the_page_lists_only_backends_a_worker_drives(operator):
    page = operator.get(OVERVIEW).content.decode()
    options = re.findall(r'<option value="([^"]+)"', page)
    assert "default" in options and "memory" in options
    assert "eager" not in options and "immediate" not in options
    assert re.search(r'<option value="default" selected>', page)


def test_a_store_that_cannot_be_read_is_said_not_raised(operator, unreachable):
    for page in (OVERVIEW, LIVE, WORKERS, SCHEDULES):
        response = operator.get(page, {"backend": unreachable})
        assert response.status_code == 200
        text = response.content.decode()
        assert "Cannot read the store: OperationalError" in text, page
    assert board_data(operator.get(LIVE, {"backend": unreachable}))["ok"] is False


def test_a_failed_read_leaves_the_requests_transaction_usable(operator, monkeypatch):
    # The store shares the request's connection, inside a transaction (as with
    # ATOMIC_REQUESTS): a read that fails must not leave that transaction aborted.
    from django.conf import settings
    from django.db import transaction

    if "postgres" not in settings.TASKS:
        pytest.skip("no postgres server on this machine")
    backend = task_backends["postgres"]

    def failing(*args, **kwargs):
        with connections[backend.worker_store.using].cursor() as cursor:
            cursor.execute("SELECT * FROM conveyor_no_such_table")

    monkeypatch.setattr(type(backend), "throughput", failing)
    with transaction.atomic(using="postgres"):
        page = operator.get(OVERVIEW, {"backend": "postgres"}).content.decode()
        assert "Cannot read the store: ProgrammingError" in page
        with connections["postgres"].cursor() as cursor:  # still usable
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)


def test_settled_minutes_are_read_once_and_new_ends_still_show(operator, monkeypatch):
    alias, backend = "memory", task_backends["memory"]
    asked = []
    real = type(backend).throughput

    def counted(self, since, **kwargs):
        asked.append(since)
        return real(self, since, **kwargs)

    monkeypatch.setattr(type(backend), "throughput", counted)
    long_ago = timezone.now() - timedelta(minutes=30)
    on(tasks.add, alias).enqueue(1, 1)
    [old] = backend.claim("w", QueueSelector(), 1)
    backend.complete([(old, returned(2, finished_at=long_ago))])
    first = board_data(operator.get(LIVE, {"backend": alias}))
    on(tasks.add, alias).enqueue(2, 2)
    [new] = backend.claim("w", QueueSelector(), 1)
    backend.complete([(new, returned(4))])
    second = board_data(operator.get(LIVE, {"backend": alias}))
    assert sum(p["succeeded"] for p in first["throughput"]) == 1
    assert sum(p["succeeded"] for p in second["throughput"]) == 2
    assert asked[1] - asked[0] >= timedelta(minutes=55)  # the second read began near now


def test_a_lease_of_no_whole_minutes_never_halves_a_settled_minute(operator, monkeypatch):
    import dataclasses

    alias, backend = "memory", task_backends["memory"]
    options = dataclasses.replace(backend.conveyor_options, lease=90.0)
    monkeypatch.setattr(backend, "conveyor_options", options)
    # Settled after lease + a minute (2.5 min): that moment falls inside this minute.
    minute = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=3)
    for second in range(0, 60, 5):  # twelve jobs over the whole minute
        on(tasks.add, alias).enqueue(second, 0)
        [job] = backend.claim("w", QueueSelector(), 1)
        backend.complete([(job, returned(0, finished_at=minute + timedelta(seconds=second)))])
    for _ in range(3):  # each look after the first reads only what is not settled
        data = board_data(operator.get(LIVE, {"backend": alias}))
        assert sum(p["succeeded"] for p in data["throughput"]) == 12
