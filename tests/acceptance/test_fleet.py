"""Fleets with real supervisors: two machines split the counts; memory-bound recycling."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from django.tasks import TaskResultStatus

from tests.helpers import Worker, job, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance


def processes_by_queue(backend) -> Counter:  # type: ignore[no-untyped-def]
    return Counter(
        (info.supervisor, info.queues) for info in backend.workers() if info.kind == "process"
    )


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_two_machines_split_the_counts_as_documented(backend, backend_alias):
    counts = "emails=2,reports=1,default=2"
    machines = [
        Worker(backend_alias, "--processes", counts, "--machine", str(n), "--of", "2")
        for n in (1, 2)
    ]
    try:
        wait_for(lambda: sum(processes_by_queue(backend).values()) == 5, timeout=30)
        running = processes_by_queue(backend)
        supervisors = sorted({supervisor for supervisor, _ in running})
        assert len(supervisors) == 2
        per_queue = Counter()
        for (_, queues), count in running.items():
            per_queue[queues] += count
        # Numbered default, default, emails, emails, reports: machine 1 takes the 1st, 3rd
        # and 5th, machine 2 the 2nd and 4th.
        assert per_queue == Counter({"default": 2, "emails": 2, "reports": 1})
        shares = sorted(
            sorted(q for (s, q), c in running.items() if s == sup for _ in range(c))
            for sup in supervisors
        )
        assert shares == [["default", "emails"], ["default", "emails", "reports"]]
        results = [
            on(tasks.add, backend_alias, queue_name=q).enqueue(1, 1)
            for q in ("default", "emails", "reports")
        ]
        wait_for(lambda: all(job(r).status == TaskResultStatus.SUCCESSFUL for r in results))
    finally:
        for machine in machines:
            machine.signal(signal.SIGTERM)
        for machine in machines:
            assert machine.wait() == 0, machine.output


def test_a_process_over_its_memory_limit_is_replaced(backend, backend_alias):
    results = [on(tasks.add, backend_alias).enqueue(i, 1) for i in range(4)]
    worker = Worker(backend_alias, "--processes", "1", "--max-memory", "1", "--until-done")
    assert worker.wait() == 0, worker.output
    assert all(job(r).status == TaskResultStatus.SUCCESSFUL for r in results)
    assert len({job(r).worker_ids[0] for r in results}) == 4  # a fresh process each time
    assert "over its limit of 1 MiB" in worker.output


def test_a_host_config_file_sets_the_processes(backend, backend_alias, tmp_path: Path):
    host = tmp_path / "host.py"
    host.write_text('PROCESSES = {"emails": 1, "reports": 1}\nTHREADS = 2\n')
    worker = Worker(backend_alias, "--config", str(host))
    try:
        wait_for(lambda: sum(processes_by_queue(backend).values()) == 2, timeout=30)
        assert sorted(q for _, q in processes_by_queue(backend)) == ["emails", "reports"]
        assert {i.threads for i in backend.workers() if i.kind == "process"} == {2}
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output
    bad = tmp_path / "bad.py"
    bad.write_text("PROCESES = 2\n")
    refused = Worker(backend_alias, "--config", str(bad))
    assert refused.wait() != 0
    assert "unknown option(s) PROCESES" in refused.output
