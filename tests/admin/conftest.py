"""Fixtures for the admin tests: a superuser's client, limited staff users, jobs by state."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from conveyor.backends.database.models import Job

JOBS = reverse("admin:conveyor_job_changelist")
SCHEDULES = reverse("admin:conveyor_schedule_changelist")
WORKERS = reverse("admin:conveyor_worker_changelist")


def job_page(job: Job) -> str:
    return reverse("admin:conveyor_job_change", args=[job.pk])


def row(result_id: str) -> Job:
    """The stored row of a job, by its result id."""
    return Job.objects.get(uuid=result_id)


@pytest.fixture
def staff_client(db: None) -> Callable[..., Client]:
    """A client logged in as a staff user holding only the named permissions of Conveyor."""

    def make(*codenames: str) -> Client:
        user = User.objects.create_user(f"staff-{'-'.join(codenames) or 'none'}", is_staff=True)
        found = Permission.objects.filter(
            content_type__app_label="conveyor", codename__in=codenames
        )
        assert found.count() == len(codenames), codenames
        user.user_permissions.set(found)
        client = Client()
        client.force_login(user)
        return client

    return make


def act(client: Client, action: str, *jobs: Job, url: str = JOBS, **extra: str) -> list[str]:
    """Run an admin action on ``jobs`` (a POST to the list); the messages it left."""
    data = {"action": action, "_selected_action": [str(job.pk) for job in jobs], **extra}
    response = client.post(url, data, follow=True)
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]
