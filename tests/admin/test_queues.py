"""The paused queues admin: pause (add), resume (delete), clear and dedupe actions."""

from __future__ import annotations

import pytest
from django.urls import reverse

from conveyor import queues
from conveyor.backends.database.models import QueuePause
from tests.admin.conftest import act
from tests.helpers import on
from tests.testapp import tasks

pytestmark = pytest.mark.django_db

PAUSES = reverse("admin:conveyor_queuepause_changelist")
ADD = reverse("admin:conveyor_queuepause_add")


def test_pausing_and_resuming_a_queue(admin_client):
    response = admin_client.post(
        ADD, {"backend_name": "default", "queue_name": "emails", "until_0": "", "until_1": ""}
    )
    assert response.status_code == 302, response.content
    assert queues.paused() == {"emails": None}
    pause = QueuePause.objects.get(queue_name="emails")
    response = admin_client.post(
        reverse("admin:conveyor_queuepause_delete", args=[pause.pk]), {"post": "yes"}
    )
    assert response.status_code == 302
    assert queues.paused() == {}


def test_an_unknown_queue_is_refused_on_the_form(admin_client):
    response = admin_client.post(
        ADD, {"backend_name": "default", "queue_name": "nowhere", "until_0": "", "until_1": ""}
    )
    assert response.status_code == 200
    assert "no queue &#x27;nowhere&#x27;" in response.content.decode()
    assert queues.paused() == {}


def test_clearing_and_deduplicating_paused_queues(admin_client):
    mail = on(tasks.add, "default", queue_name="emails")
    mail.enqueue(1, 1)
    mail.enqueue(1, 1)
    mail.enqueue(2, 2)
    queues.pause("emails")
    pause = QueuePause.objects.get(queue_name="emails")
    assert "Deleted 1 duplicate job(s)." in act(
        admin_client, "remove_duplicate_jobs", pause, url=PAUSES
    )
    assert "Deleted 2 job(s)." in act(admin_client, "clear_jobs", pause, url=PAUSES)
