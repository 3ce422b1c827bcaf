"""``conveyor worker --metrics-port``: one endpoint for all of a worker's processes."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Worker, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    """Every sample the worker serves, or None while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples that carry ``labels``."""
    return sum(
        value
        for (found, have), value in samples.items()
        if found == name and labels.items() <= dict(have).items()
    )


def test_the_worker_serves_the_counts_of_all_its_processes(backend_alias):
    add, explode = "tests.testapp.tasks.add", "tests.testapp.tasks.explode"
    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(30)]
    results += [on(tasks.explode, backend_alias).enqueue("boom") for _ in range(3)]
    port = free_port()
    with Worker(backend_alias, "--processes", "2", "--metrics-port", f"127.0.0.1:{port}") as worker:
        wait_for(lambda: all(r.refresh() or r.is_finished for r in results), timeout=60)

        def counted() -> dict | None:
            samples = scrape(port)
            done = samples and total(samples, "conveyor_jobs_succeeded_total", task=add) == 30
            return samples if done else None

        samples = wait_for(counted, timeout=30)
        assert total(samples, "conveyor_jobs_failed_total", task=explode) == 3
        assert total(samples, "conveyor_jobs_started_total", backend=backend_alias) == 33
        assert total(samples, "conveyor_job_run_seconds_count", backend=backend_alias) == 33
        assert total(samples, "conveyor_job_pickup_seconds_count", backend=backend_alias) == 33
        assert total(samples, "conveyor_workers_online", backend=backend_alias, kind="process") == 2
        assert total(samples, "conveyor_store_up", backend=backend_alias) == 1
        ready = total(samples, "conveyor_queue_jobs", backend=backend_alias, state="ready")
        assert ready == 0
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output
    assert f"Serving Prometheus metrics on 127.0.0.1:{port}" in worker.output
    assert scrape(port) is None  # the endpoint closed with the worker


def test_a_port_in_use_stops_the_worker_with_a_clear_error(backend_alias):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with Worker(backend_alias, "--metrics-port", f"127.0.0.1:{port}") as worker:
            assert worker.wait() == 3, worker.output
    assert f"Cannot serve metrics on 127.0.0.1:{port}" in worker.output
    assert "Traceback" not in worker.output
