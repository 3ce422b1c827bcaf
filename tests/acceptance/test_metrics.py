"""``conveyor worker --metrics-port``: one endpoint for all of a worker's processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Worker, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int, query: str = "") -> dict[tuple[str, tuple], float] | None:
    """Every sample the worker serves, or None while it does not answer yet."""
    url = f"http://127.0.0.1:{port}/metrics{query}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counted(port: int, name: str, count: float, **labels: str) -> dict:
    """The samples served once ``name`` (over the samples with ``labels``) reaches ``count``."""

    def reached() -> dict | None:
        samples = scrape(port)
        return samples if samples and total(samples, name, **labels) == count else None

    return wait_for(reached, timeout=30)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples that carry ``labels``."""
    return sum(
        value
        for (found, have), value in samples.items()
        if found == name and labels.items() <= dict(have).items()
    )


def listening_socket(port: int) -> str:
    """The inode of the socket listening on ``port`` (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def open_sockets(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                found.add(target[8:-1])
    return found


def test_the_worker_serves_the_counts_of_all_its_processes(backend, backend_alias):
    add, explode = "tests.testapp.tasks.add", "tests.testapp.tasks.explode"
    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(30)]
    results += [on(tasks.explode, backend_alias).enqueue("boom") for _ in range(3)]
    port = free_port()
    with Worker(backend_alias, "--processes", "2", "--metrics-port", f"127.0.0.1:{port}") as worker:
        wait_for(lambda: all(r.refresh() or r.is_finished for r in results), timeout=60)

        samples = counted(port, "conveyor_jobs_succeeded_total", 30, task=add)
        assert total(samples, "conveyor_jobs_failed_total", task=explode) == 3
        assert total(samples, "conveyor_jobs_started_total", backend=backend_alias) == 33
        assert total(samples, "conveyor_job_run_seconds_count", backend=backend_alias) == 33
        assert total(samples, "conveyor_job_pickup_seconds_count", backend=backend_alias) == 33
        assert total(samples, "conveyor_workers_online", backend=backend_alias, kind="process") == 2
        assert total(samples, "conveyor_store_up", backend=backend_alias) == 1
        ready = total(samples, "conveyor_queue_jobs", backend=backend_alias, state="ready")
        assert ready == 0
        only = scrape(port, "?name[]=conveyor_store_up")
        assert only is not None and {name for name, _ in only} == {"conveyor_store_up"}
        listening = listening_socket(port)
        for info in backend.workers():
            if info.kind == "process":  # the supervisor's socket is not theirs to hold
                assert listening not in open_sockets(info.pid)
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


def samples_directory(supervisor_pid: int) -> Path | None:
    found = list(Path(tempfile.gettempdir()).glob(f"conveyor-metrics-{supervisor_pid}-*"))
    return found[0] if found else None


def test_replaced_processes_carry_their_counts_on_in_a_few_files(backend_alias):
    add = "tests.testapp.tasks.add"
    results = [on(tasks.add, backend_alias).enqueue(i, i) for i in range(24)]
    port = free_port()
    with Worker(
        backend_alias,
        "--processes",
        "2",
        "--max-tasks-per-child",
        "2",  # a new process every two jobs: a dozen processes in all
        "--metrics-port",
        f"127.0.0.1:{port}",
    ) as worker:
        wait_for(lambda: all(r.refresh() or r.is_finished for r in results), timeout=90)

        counted(port, "conveyor_jobs_succeeded_total", 24, task=add)
        directory = samples_directory(worker.pid)
        assert directory is not None
        names = sorted(path.name for path in directory.glob("*.db"))
        # Two places for processes (and the supervisor's own), whatever the replacements.
        pattern = r"(counter|histogram)_(process-[12]|supervisor|announcer-\d)\.db"
        assert all(re.fullmatch(pattern, name) for name in names), names
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output
    assert not directory.exists()  # removed with the supervisor


def test_a_killed_supervisors_samples_are_removed_by_the_next(backend_alias):
    port = free_port()
    with Worker(backend_alias, "--metrics-port", f"127.0.0.1:{port}") as first:
        wait_for(lambda: scrape(port) is not None, timeout=30)
        directory = samples_directory(first.pid)
        assert directory is not None
        first.kill_group()
        first.wait()
    assert directory.exists()
    long_ago = time.time() - 3600  # as if it had been left there a while ago
    os.utime(directory, (long_ago, long_ago))
    port = free_port()
    with Worker(backend_alias, "--metrics-port", f"127.0.0.1:{port}") as second:
        wait_for(lambda: scrape(port) is not None, timeout=30)
        assert not directory.exists()
        second.signal(signal.SIGTERM)
        assert second.wait() == 0, second.output


def test_a_run_the_supervisor_stops_at_its_time_limit_and_retries_is_counted(
    backend_alias, tmp_path
):
    overruns = "tests.testapp.tasks.overruns"
    result = on(tasks.overruns, backend_alias, retries=1, retry_backoff=0.1).enqueue(
        str(tmp_path / "log"), 30
    )
    port = free_port()
    with Worker(backend_alias, "--metrics-port", f"127.0.0.1:{port}") as worker:
        wait_for(lambda: result.refresh() or result.is_finished, timeout=60)

        samples = counted(port, "conveyor_jobs_failed_total", 1, task=overruns)
        assert total(samples, "conveyor_jobs_retried_total", task=overruns) == 1
        assert total(samples, "conveyor_jobs_started_total", task=overruns) == 2
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output
