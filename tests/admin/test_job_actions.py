"""The jobs admin's actions: each works, is logged per job, and needs its permission."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.tasks import task_backends
from django.utils import timezone

import conveyor
from conveyor.records import QueueSelector
from conveyor.testing import run_until_done
from tests.admin.conftest import JOBS, act, row
from tests.testapp import tasks

pytestmark = pytest.mark.django_db


def logged(job, flag: int = CHANGE) -> list[str]:  # type: ignore[no-untyped-def]
    entries = LogEntry.objects.filter(object_id=str(job.pk), action_flag=flag)
    return [entry.change_message for entry in entries.order_by("id")]


def test_retry_enqueues_failed_and_cancelled_jobs_again_as_new_jobs(admin_client):
    failed = row(tasks.explode.enqueue("boom").id)
    run_until_done()
    cancelled = row(tasks.add.using(queue_name="reports", priority=3).enqueue(1, b=2).id)
    conveyor.cancel(str(cancelled.uuid))
    pending = row(tasks.add.enqueue(5, 5).id)

    said = act(admin_client, "retry_jobs", failed, cancelled, pending)
    assert "2 jobs were enqueued again, as new jobs." in said
    assert "1 selected was left alone: not failed or cancelled." in said
    failed.refresh_from_db()
    assert failed.state == "failed" and len(failed.errors) == 1  # its history stays
    [again] = logged(cancelled)
    new = row(again.removeprefix("Retried as job ").rstrip("."))
    assert (new.state, new.args, new.kwargs) == ("ready", [1], {"b": 2})
    assert (new.queue_name, new.priority) == ("reports", 3)
    assert logged(failed)[0].startswith("Retried as job ")
    assert logged(pending) == []


def test_run_now_makes_scheduled_jobs_ready(admin_client):
    later = tasks.add.using(run_after=timezone.now() + timedelta(days=1))
    scheduled = row(later.enqueue(1, 1).id)
    ready = row(tasks.add.enqueue(2, 2).id)
    said = act(admin_client, "run_jobs_now", scheduled, ready)
    assert "1 job runs now." in said
    assert "1 selected was left alone: not scheduled." in said
    scheduled.refresh_from_db()
    assert scheduled.state == "ready" and scheduled.available_at <= timezone.now()
    assert logged(scheduled) == ["Made due now."] and logged(ready) == []
    assert run_until_done().succeeded == 2


def test_cancel_cancels_pending_jobs_and_asks_running_ones_to_stop(admin_client):
    running = row(tasks.add.enqueue(1, 1).id)
    task_backends["default"].claim("w", QueueSelector(), 1)
    done = row(tasks.noop.enqueue().id)
    run_until_done()
    waiting = row(tasks.add.using(run_after=timezone.now() + timedelta(days=1)).enqueue(3, 3).id)

    said = act(admin_client, "cancel_jobs", running, waiting, done)
    assert "1 job was cancelled. 1 running job was asked to stop." in said
    assert "1 selected was left alone: already finished." in said
    running.refresh_from_db()
    waiting.refresh_from_db()
    assert running.cancel_requested and running.state == "running"
    assert waiting.state == "cancelled"
    assert logged(running) == ["Cancelled: asked to stop."]
    assert logged(waiting) == ["Cancelled."] and logged(done) == []


def test_delete_removes_finished_jobs_after_a_confirmation(admin_client):
    done = row(tasks.noop.enqueue().id)
    run_until_done()
    pending = row(tasks.add.enqueue(1, 1).id)

    page = admin_client.post(
        JOBS, {"action": "delete_selected", "_selected_action": [done.pk, pending.pk]}
    )
    assert page.status_code == 200 and b"Are you sure" in page.content  # the confirmation
    said = act(admin_client, "delete_selected", done, post="yes")
    assert "Successfully deleted 1 job." in said
    assert not type(done).objects.filter(pk=done.pk).exists()
    assert logged(done, DELETION) == [""]
    pending.refresh_from_db()  # never deleted: it has not finished
    said = act(admin_client, "delete_selected", pending, post="yes")
    assert "1 selected was left alone: not finished." in said
    pending.refresh_from_db()


def test_actions_need_their_permission(staff_client):
    done = row(tasks.explode.enqueue("boom").id)
    run_until_done()
    pending = row(tasks.add.enqueue(1, 1).id)

    viewer = staff_client("view_job")
    listing = viewer.get(JOBS)
    assert listing.status_code == 200
    assert listing.context["action_form"] is None or not [
        name for name, _ in listing.context["action_form"].fields["action"].choices if name
    ]
    for action in ("retry_jobs", "run_jobs_now", "cancel_jobs"):
        act(viewer, action, pending, done)
    act(viewer, "delete_selected", done, post="yes")
    pending.refresh_from_db()
    assert pending.state == "ready" and row(str(done.uuid)).state == "failed"
    assert type(done).objects.count() == 2 and LogEntry.objects.count() == 0

    changer = staff_client("view_job", "change_job")
    choices = changer.get(JOBS).context["action_form"].fields["action"].choices
    assert {name for name, _ in choices if name} == {"retry_jobs", "run_jobs_now", "cancel_jobs"}
    act(changer, "delete_selected", done, post="yes")
    assert type(done).objects.filter(pk=done.pk).exists()
    act(changer, "cancel_jobs", pending)
    pending.refresh_from_db()
    assert pending.state == "cancelled"

    deleter = staff_client("view_job", "delete_job")
    act(deleter, "delete_selected", done, post="yes")
    assert not type(done).objects.filter(pk=done.pk).exists()


def test_a_job_whose_task_is_gone_is_reported_and_the_others_go_on(admin_client):
    gone = row(tasks.explode.enqueue("boom").id)
    failed = row(tasks.explode.enqueue("bang").id)
    run_until_done()
    type(gone).objects.filter(pk=gone.pk).update(task_path="tests.testapp.tasks.removed")
    said = act(admin_client, "retry_jobs", gone, failed)
    assert "1 job was enqueued again, as a new job." in said
    assert any(str(gone.uuid) in text and "removed" in text for text in said), said
    assert logged(gone) == [] and len(logged(failed)) == 1


def test_an_action_acts_on_a_limited_number_of_rows_at_once(admin_client, monkeypatch):
    from conveyor.admin.jobs import JobAdmin

    monkeypatch.setattr(JobAdmin, "action_limit", 2)
    later = tasks.add.using(run_after=timezone.now() + timedelta(days=1))
    jobs = [row(later.enqueue(n, n).id) for n in range(3)]
    said = act(admin_client, "run_jobs_now", jobs[0], select_across="1")
    assert "Only the first 2 selected were acted on; run the action again for the rest." in said
    assert "2 jobs run now." in said
    assert task_backends["default"].stats().scheduled == 1
    assert act(admin_client, "run_jobs_now", jobs[0], select_across="1")[-1] == "1 job runs now."
