"""The dashboard's buttons: POST only, CSRF-checked, permission-checked, logged, and said."""

from __future__ import annotations

import logging
import re

import pytest
from django.tasks import TaskResultStatus, task_backends

from conveyor import queues, schedules
from conveyor.records import QueueSelector
from tests.dashboard.conftest import OVERVIEW, SCHEDULES, notes, url
from tests.helpers import job, on
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(databases="__all__")


def failed(alias: str = "default"):
    """A job that ran and failed."""
    result = on(tasks.explode, alias).enqueue("boom")
    backend = task_backends[alias]
    [claimed] = backend.claim("w", QueueSelector(), 1)
    from tests.contract.stores import raised
    from tests.dashboard.test_pages import BOOM

    backend.fail(claimed, raised(BOOM))
    return result


def jobs_of(alias: str = "default") -> int:
    return task_backends[alias].stats().ready


def test_retry_enqueues_the_call_again_and_says_so(operator, caplog):
    old = failed()
    with caplog.at_level(logging.INFO, logger="conveyor.dashboard"):
        response = operator.post(url("retry", old.id), {"backend": "default"}, follow=True)
    assert response.status_code == 200
    [said] = notes(response)
    new_id = re.search(r"as job (\S+)\.$", said).group(1)
    assert said.startswith(f"Job {old.id} (tests.testapp.tasks.explode) was enqueued again")
    again = task_backends["default"].get_result(new_id)
    assert again.status == TaskResultStatus.READY and again.args == ["boom"]
    assert job(old).status == TaskResultStatus.FAILED  # the old job keeps its history
    logged = [r.getMessage() for r in caplog.records]
    assert any(old.id in line and "tests.testapp.tasks.explode" in line for line in logged)


def test_retry_of_a_job_that_has_not_finished_is_refused_with_a_reason(operator):
    waiting = on(tasks.add, "default").enqueue(1, 1)
    response = operator.post(url("retry", waiting.id), {"backend": "default"}, follow=True)
    [said] = notes(response)
    assert said.startswith(f"Job {waiting.id} was not retried: ValueError") and jobs_of() == 1


def test_retry_of_an_unknown_job_says_so(operator):
    missing = "00000000-0000-0000-0000-000000000000"
    response = operator.post(url("retry", missing), {"backend": "default"}, follow=True)
    [said] = notes(response)
    assert said.startswith(f"Job {missing} was not retried: TaskResultDoesNotExist")


def test_cancel_stops_a_job_that_has_not_started(operator):
    waiting = on(tasks.add, "default").enqueue(1, 1)
    response = operator.post(url("cancel", waiting.id), {"backend": "default"}, follow=True)
    assert notes(response) == [f"Job {waiting.id} (tests.testapp.tasks.add) was cancelled."]
    assert job(waiting).status == TaskResultStatus.FAILED and jobs_of() == 0


def test_cancel_asks_the_worker_of_a_running_job_to_stop_it(operator):
    running = on(tasks.add, "memory").enqueue(1, 1)
    backend = task_backends["memory"]
    [claimed] = backend.claim("w", QueueSelector(), 1)
    response = operator.post(url("cancel", running.id), {"backend": "memory"}, follow=True)
    [said] = notes(response)
    assert "is running: its worker was asked to stop it" in said
    assert backend.cancels([(claimed.key, claimed.delivery)]) == {(claimed.key, claimed.delivery)}


def test_a_button_needs_the_csrf_token(make_client):
    client = make_client("change_job", csrf=True)
    old = failed()
    refused = client.post(url("retry", old.id), {"backend": "default"})
    assert refused.status_code == 403 and jobs_of() == 0
    page = client.get(OVERVIEW).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    done = client.post(url("retry", old.id), {"backend": "default", "csrfmiddlewaretoken": token})
    assert done.status_code == 302 and jobs_of() == 1


def test_a_button_needs_its_permission(make_client):
    viewer = make_client()  # staff, no Conveyor permission
    old = failed()
    assert viewer.post(url("retry", old.id), {"backend": "default"}).status_code == 403
    waiting = on(tasks.add, "default").enqueue(1, 1)
    assert viewer.post(url("cancel", waiting.id), {"backend": "default"}).status_code == 403
    assert job(waiting).status == TaskResultStatus.READY and jobs_of() == 1
    schedules.create("hourly-noop", "tests.testapp.tasks.noop", every=3600)
    action = url("schedule-action", "pause", "hourly-noop")
    assert viewer.post(action, {"backend": "default"}).status_code == 403
    assert not schedules.get("hourly-noop").paused
    jobs_only = make_client("change_job")
    assert jobs_only.post(action, {"backend": "default"}).status_code == 403
    queue = url("queue-action", "pause", "emails")
    assert jobs_only.post(queue, {"backend": "default"}).status_code == 403
    assert queues.paused() == {}


def test_a_button_is_post_only_and_staff_only(operator, make_client):
    old = failed()
    assert operator.get(url("retry", old.id)).status_code == 405
    outsider = make_client("change_job", staff=False)
    assert outsider.post(url("retry", old.id), {"backend": "default"}).status_code == 403
    assert jobs_of() == 0


def test_a_button_brings_the_user_back_but_never_off_the_site(operator):
    old = failed()
    back = operator.post(url("retry", old.id), {"backend": "default", "next": SCHEDULES})
    assert back["Location"] == SCHEDULES
    away = operator.post(
        url("retry", old.id), {"backend": "default", "next": "https://evil.example/"}
    )
    assert away["Location"] == OVERVIEW + "?backend=default"


def test_schedule_buttons_run_pause_and_resume(operator):
    schedules.create("hourly-noop", "tests.testapp.tasks.noop", every=3600, backend="memory")

    def press(verb: str) -> list[str]:
        action = url("schedule-action", verb, "hourly-noop")
        return notes(operator.post(action, {"backend": "memory"}, follow=True))

    assert press("pause") == ["Schedule 'hourly-noop' is paused."]
    assert schedules.get("hourly-noop", backend="memory").paused
    [ran] = press("run")
    assert ran.startswith("Schedule 'hourly-noop' was run now as job ")
    assert task_backends["memory"].stats().ready == 1
    assert press("resume") == ["Schedule 'hourly-noop' is resumed."]
    assert not schedules.get("hourly-noop", backend="memory").paused
    [unknown] = press_unknown(operator)
    assert unknown.startswith("Schedule 'no-such-schedule': ")


def press_unknown(operator) -> list[str]:
    action = url("schedule-action", "run", "no-such-schedule")
    return notes(operator.post(action, {"backend": "memory"}, follow=True))


def test_queue_buttons_pause_and_resume(operator):
    pause = url("queue-action", "pause", "emails")
    said = notes(operator.post(pause, {"backend": "default"}, follow=True))
    assert said == ["Queue 'emails' is paused: workers take no job from it until it is resumed."]
    assert queues.paused() == {"emails": None}
    page = operator.get(OVERVIEW).content.decode()
    row = re.search(r'<tr data-queue="emails">(.*?)</tr>', page, re.S).group(1)
    assert "paused" in row and "Resume" in row
    resume = url("queue-action", "resume", "emails")
    assert notes(operator.post(resume, {"backend": "default"}, follow=True)) == [
        "Queue 'emails' is resumed."
    ]
    assert queues.paused() == {}
    unknown = url("queue-action", "pause", "no-such-queue")
    [said] = notes(operator.post(unknown, {"backend": "default"}, follow=True))
    assert said.startswith("Queue 'no-such-queue': ") and queues.paused() == {}


def test_an_unknown_verb_is_not_found(operator):
    assert operator.post(url("queue-action", "clear", "emails")).status_code == 404
    assert operator.post(url("schedule-action", "delete", "x")).status_code == 404
