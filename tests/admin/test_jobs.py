"""The jobs admin: the list with its filters and search, and a job's read-only page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from conveyor import schedules
from conveyor.testing import run_until_done
from tests.admin.conftest import JOBS, job_page, row
from tests.testapp import tasks

pytestmark = pytest.mark.django_db


def listed(response) -> set[str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 200
    return {str(job.uuid) for job in response.context["cl"].result_list}


def test_the_list_shows_jobs_and_filters_them(admin_client):
    added = tasks.add.enqueue(1, 2)
    mail = tasks.send_email.enqueue("a@example.com")
    later = tasks.add.using(run_after=timezone.now() + timedelta(hours=1)).enqueue(3, 4)
    everything = {added.id, mail.id, later.id}

    page = admin_client.get(JOBS)
    assert listed(page) == everything
    text = page.content.decode()
    assert "tests.testapp.tasks.send_email" in text and "3 jobs" in text
    assert listed(admin_client.get(JOBS, {"state__exact": "scheduled"})) == {later.id}
    assert listed(admin_client.get(JOBS, {"queue_name": "emails"})) == {mail.id}
    assert listed(admin_client.get(JOBS, {"task_path": "tests.testapp.tasks.add"})) == {
        added.id,
        later.id,
    }
    assert listed(admin_client.get(JOBS, {"backend_name": "default"})) == everything
    assert listed(admin_client.get(JOBS, {"backend_name": "elsewhere"})) == set()
    since = (timezone.now() - timedelta(days=1)).isoformat()
    assert listed(admin_client.get(JOBS, {"enqueued_at__gte": since})) == everything
    assert listed(admin_client.get(JOBS, {"finished_at__isnull": "True"})) == everything


def test_the_filters_offer_known_values(admin_client):
    tasks.send_email.enqueue("a@example.com")
    context = admin_client.get(JOBS).context
    choices = {
        spec.title: {c["display"] for c in spec.choices(context["cl"])}
        for spec in context["cl"].filter_specs
    }
    assert {"default", "emails", "reports"} <= choices["queue"]
    assert "tests.testapp.tasks.send_email" in choices["task"]
    assert "default" in choices["backend"]


def test_search_finds_a_job_by_result_id_or_task_path(admin_client):
    added = tasks.add.enqueue(1, 2)
    mail = tasks.send_email.enqueue("a@example.com")
    assert listed(admin_client.get(JOBS, {"q": added.id})) == {added.id}
    assert listed(admin_client.get(JOBS, {"q": f" {mail.id.upper()} "})) == {mail.id}
    assert listed(admin_client.get(JOBS, {"q": "send_email"})) == {mail.id}
    assert listed(admin_client.get(JOBS, {"q": "nothing-like-it"})) == set()


def test_a_failed_job_shows_its_call_and_escaped_traceback(admin_client):
    failed = tasks.explode.enqueue("<script>alert('x')</script>")
    run_until_done()
    page = admin_client.get(job_page(row(failed.id)))
    assert page.status_code == 200
    text = page.content.decode()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "<script>alert" not in text
    assert "builtins.ValueError" in text and "Traceback" in text
    assert "<pre>" in text  # tracebacks and arguments keep their lines


def test_a_job_page_shows_arguments_result_and_attempts(admin_client):
    done = tasks.add.enqueue(20, b=22)
    run_until_done()
    job = row(done.id)
    text = admin_client.get(job_page(job)).content.decode()
    assert "<pre>[\n  20\n]</pre>" in text
    assert "&quot;b&quot;: 22" in text
    assert "<pre>42</pre>" in text  # the return value
    assert f"<li>{job.worker_ids[0]}</li>" in text  # the worker of each attempt
    assert "Save" not in text  # read-only


def test_a_job_page_names_the_schedule_that_fired_it(admin_client):
    schedules.create("nightly-report", tasks.scheduled_report, args=["r"])
    fired = schedules.run("nightly-report")
    plain = tasks.add.enqueue(1, 1)
    text = admin_client.get(job_page(row(fired.id))).content.decode()
    assert "nightly-report" in text and "/admin/conveyor/schedule/" in text
    assert "on demand" in text
    assert "nightly-report" not in admin_client.get(job_page(row(plain.id))).content.decode()


def test_jobs_are_not_added_or_edited_by_hand(admin_client):
    job = row(tasks.add.enqueue(1, 2).id)
    assert admin_client.get("/admin/conveyor/job/add/").status_code == 403
    response = admin_client.post(job_page(job), {"priority": 99, "state": "succeeded"})
    assert response.status_code == 403
    job.refresh_from_db()
    assert (job.priority, job.state) == (0, "ready")
    # Only a finished job may be deleted from its page.
    assert admin_client.get(reverse("admin:conveyor_job_delete", args=[job.pk])).status_code == 403
