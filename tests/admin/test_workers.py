"""The workers admin: the registry, read-only, with each worker online, silent or stopped."""

from __future__ import annotations

import pytest
from django.tasks import task_backends
from django.urls import reverse

from conveyor.backends.database.models import Worker
from conveyor.records import WorkerInfo
from conveyor.testing import store_clock
from tests.admin.conftest import WORKERS

pytestmark = pytest.mark.django_db


def register(worker_id: str, kind: str = "supervisor") -> None:
    info = WorkerInfo(id=worker_id, backend="default", kind=kind, host="box", pid=42)
    task_backends["default"].register_worker(info)


def statuses(client) -> dict[str, str]:  # type: ignore[no-untyped-def]
    response = client.get(WORKERS)
    assert response.status_code == 200
    model_admin = response.context["cl"].model_admin
    return {w.id: model_admin.status(w) for w in response.context["cl"].result_list}


def test_workers_are_online_silent_or_stopped(admin_client):
    store = task_backends["default"]
    for worker_id in ("quiet", "old", "busy"):
        register(worker_id)
    register("busy:1", kind="process")
    store.end_worker("busy:1", "stopped: asked to")
    with store_clock() as clock:
        clock.advance(120)  # "old" has not beaten for two minutes: past its lease
        store.heartbeat(["busy", "quiet"])
        assert statuses(admin_client) == {
            "quiet": "online",
            "busy": "online",
            "busy:1": "stopped",
            "old": "silent",
        }
    text = admin_client.get(WORKERS).content.decode()
    assert "stopped: asked to" in text and "box" in text
    running = admin_client.get(WORKERS, {"running": "yes"}).context["cl"].result_list
    assert {w.id for w in running} == {"quiet", "old", "busy"}


def test_the_registry_is_read_only(admin_client):
    register("w1")
    worker = Worker.objects.get()
    page = reverse("admin:conveyor_worker_change", args=[worker.pk])
    assert admin_client.get(page).status_code == 200
    assert admin_client.post(page, {"host": "elsewhere"}).status_code == 403
    assert admin_client.get(reverse("admin:conveyor_worker_add")).status_code == 403
    delete = reverse("admin:conveyor_worker_delete", args=[worker.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert Worker.objects.get().host == "box"
