"""Prometheus metrics in a project: jobs counted through the signals, depths read at scrape."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from conveyor.testing import run_until_done
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(databases="__all__")

METRICS = "/conveyor/metrics/"
ADD = "tests.testapp.tasks.add"
TOKEN = "s3cret-scraper-token"


def scrape(client: Client | None = None, **headers: str) -> dict[tuple[str, tuple], float]:
    """Every sample the endpoint serves, by name and labels."""
    response = (client or Client()).get(METRICS, **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def job_labels(task_path: str, queue: str = "default") -> dict[str, str]:
    return {"backend": "default", "queue": queue, "task": task_path}


@pytest.fixture
def scraper(settings) -> dict[str, str]:
    settings.CONVEYOR_METRICS_TOKEN = TOKEN
    return {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}


def test_jobs_are_counted_as_they_are_enqueued_run_retried_and_ended(scraper, tmp_path):
    add, explode = "tests.testapp.tasks.add", "tests.testapp.tasks.explode"
    retried = "tests.testapp.tasks.fails_twice"
    before = scrape(**scraper)
    for i in range(3):
        tasks.add.enqueue(i, i)
    tasks.explode.enqueue("boom")
    tasks.fails_twice.enqueue(str(tmp_path / "tries"))
    run_until_done()
    after = scrape(**scraper)

    def grew(name: str, task: str) -> float:
        return value(after, name, **job_labels(task)) - value(before, name, **job_labels(task))

    assert grew("conveyor_jobs_enqueued_total", add) == 3
    assert grew("conveyor_jobs_started_total", add) == 3
    assert grew("conveyor_jobs_succeeded_total", add) == 3
    assert grew("conveyor_jobs_failed_total", add) == 0
    assert grew("conveyor_jobs_failed_total", explode) == 1
    assert grew("conveyor_jobs_retried_total", retried) == 1  # its retry is due in 10 s
    assert grew("conveyor_jobs_failed_total", retried) == 0
    assert grew("conveyor_job_run_seconds_count", add) == 3
    assert grew("conveyor_job_run_seconds_count", retried) == 1  # the failed run
    pickups = "conveyor_job_pickup_seconds_count"
    assert (
        value(after, pickups, backend="default", queue="default")
        - value(before, pickups, backend="default", queue="default")
        == 5
    )
    assert grew("conveyor_job_run_seconds_bucket", add) == 0  # buckets carry an "le" label
    assert value(after, "conveyor_job_run_seconds_bucket", le="+Inf", **job_labels(add)) >= 3


def test_queue_depths_and_workers_are_read_from_the_store(scraper):
    for i in range(4):
        tasks.send_email.enqueue(f"u{i}@example.com")
    tasks.add.enqueue(1, 1)
    from conveyor import queues

    queues.pause("emails")
    samples = scrape(**scraper)
    depth = "conveyor_queue_jobs"
    assert value(samples, depth, backend="default", queue="emails", state="ready") == 4
    assert value(samples, depth, backend="default", queue="default", state="ready") == 1
    assert value(samples, depth, backend="default", queue="reports", state="ready") == 0
    assert value(samples, "conveyor_queue_paused", backend="default", queue="emails") == 1
    assert value(samples, "conveyor_queue_paused", backend="default", queue="default") == 0
    assert value(samples, "conveyor_store_up", backend="default") == 1
    assert (
        "conveyor_workers_online",
        (("backend", "default"), ("kind", "process")),
    ) in samples


def test_the_endpoint_needs_the_token_or_a_staff_user(settings):
    assert Client().get(METRICS).status_code == 403  # no token configured: staff only
    settings.CONVEYOR_METRICS_TOKEN = TOKEN
    anonymous = Client().get(METRICS)
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"].startswith("Bearer")
    assert Client().get(METRICS, HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert Client().get(METRICS, HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    staff = Client()
    staff.force_login(User.objects.create_user("ops", is_staff=True))
    assert staff.get(METRICS).status_code == 200
    outsider = Client()
    outsider.force_login(User.objects.create_user("visitor", is_staff=False))
    assert outsider.get(METRICS).status_code == 401


def test_a_store_that_cannot_be_read_is_down_and_the_others_still_served(scraper, unreachable):
    tasks.add.enqueue(1, 1)
    samples = scrape(**scraper)
    assert value(samples, "conveyor_store_up", backend=unreachable) == 0
    assert value(samples, "conveyor_store_up", backend="default") == 1
    assert value(samples, "conveyor_queue_jobs", backend="default", queue="default", state="ready")
    assert not any(
        labels and dict(labels).get("backend") == unreachable and name == "conveyor_queue_jobs"
        for name, labels in samples
    )


def test_metrics_can_be_turned_off(settings, scraper):
    enqueued = ("conveyor_jobs_enqueued_total", tuple(sorted(job_labels(ADD).items())))
    before = scrape(**scraper).get(enqueued, 0.0)
    settings.CONVEYOR_METRICS = False
    tasks.add.enqueue(1, 1)
    run_until_done()
    assert scrape(**scraper).get(enqueued, 0.0) == before
    settings.CONVEYOR_METRICS = True
    tasks.add.enqueue(1, 1)
    assert scrape(**scraper).get(enqueued, 0.0) == before + 1


def test_the_worker_option_is_checked():
    with pytest.raises(CommandError, match="--metrics-port"):
        call_command("conveyor", "worker", "--in-process", "--metrics-port", "9100")
    with pytest.raises(CommandError, match="port from 0 to 65535; not 'nine'"):
        call_command("conveyor", "worker", "--metrics-port", "nine")
    with pytest.raises(CommandError, match="not 'host:70000'"):
        call_command("conveyor", "worker", "--metrics-port", "host:70000")


def test_a_job_that_cannot_be_counted_is_enqueued_and_run_all_the_same(monkeypatch, caplog):
    from conveyor import metrics

    def broken():
        raise FileNotFoundError("the samples directory is gone")

    monkeypatch.setattr(metrics, "jobs", broken)
    monkeypatch.setattr(metrics, "_last_failure", [-metrics.FAILURE_LOG_EVERY])
    result = tasks.add.enqueue(2, 2)
    run_until_done()
    assert result.refresh() is None and result.return_value == 4
    assert caplog.text.count("Metrics: a job could not be counted") == 1  # once a minute
