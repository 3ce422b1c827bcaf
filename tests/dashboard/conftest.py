"""Fixtures for the dashboard tests: clients of staff users with chosen permissions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

OVERVIEW = reverse("conveyor_dashboard:overview")
LIVE = reverse("conveyor_dashboard:live")
WORKERS = reverse("conveyor_dashboard:workers")
SCHEDULES = reverse("conveyor_dashboard:schedules")


def url(name: str, *args: str) -> str:
    return reverse(f"conveyor_dashboard:{name}", args=args)


@pytest.fixture
def make_client() -> Callable[..., Client]:
    """A client logged in as a user (staff unless told) holding the named permissions."""

    def make(*codenames: str, staff: bool = True, csrf: bool = False) -> Client:
        name = f"user-{'-'.join(codenames) or 'none'}-{staff}"
        user = User.objects.create_user(name, is_staff=staff)
        found = Permission.objects.filter(
            content_type__app_label="conveyor", codename__in=codenames
        )
        assert found.count() == len(codenames), codenames
        user.user_permissions.set(found)
        client = Client(enforce_csrf_checks=csrf)
        client.force_login(user)
        return client

    return make


@pytest.fixture
def operator(make_client: Callable[..., Client]) -> Client:
    """A staff user who may act on jobs, schedules and queues."""
    return make_client("change_job", "change_schedule", "change_queuepause")


def notes(response) -> list[str]:
    """The messages a followed response shows."""
    return [str(note) for note in response.context["notes"]]


@pytest.fixture(autouse=True)
def fresh_memory_store() -> None:
    """The in-process store starts empty in every test here."""
    from django.tasks import task_backends

    task_backends["memory"].clear()  # type: ignore[attr-defined]
    from conveyor.dashboard import board

    board._read_before.clear()  # each test's database starts afresh
