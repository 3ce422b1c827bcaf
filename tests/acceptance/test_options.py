"""Task options with real workers: retries, time limits, cancel, stopping per task."""

from __future__ import annotations

from pathlib import Path

from django.tasks import TaskResultStatus

from tests.helpers import Worker, job, on, wait_for
from tests.testapp import tasks


def test_retries_survive_a_worker_restart(backend_alias, tmp_path: Path):
    flaky = on(tasks.fails_twice, backend_alias).using(retry_backoff=0.3)
    result = flaky.enqueue(str(tmp_path / "tries"))
    with Worker(backend_alias, "--processes", "1") as first:
        wait_for(lambda: len(job(result).errors) == 1)
        first.signal()
        assert first.wait() == 0, first.output
    assert "runs again at" in first.output and "ValueError, retried" in first.output
    assert job(result).status == TaskResultStatus.READY  # waiting for its retry

    with Worker(backend_alias, "--processes", "1") as second:
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL)
        second.signal()
        assert second.wait() == 0, second.output
    done = job(result)
    assert done.attempts == 3 and len(done.errors) == 2 and done.return_value == "done"
    assert (tmp_path / "tries").read_text().count("try") == 3
