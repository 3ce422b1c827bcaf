"""conveyor.wait(): blocks until a job ends, woken by the backend where it can be."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.tasks import TaskResultStatus

import conveyor
from tests.helpers import Worker, on
from tests.testapp import tasks


def test_wait_returns_the_final_result_soon_after_the_job_ends(backend_alias, tmp_path: Path):
    with Worker(backend_alias, "--processes", "1") as worker:
        quick = on(tasks.add, backend_alias).enqueue(2, 3)
        assert conveyor.wait(quick, timeout=10).return_value == 5

        slow = on(tasks.log_line, backend_alias).enqueue(str(tmp_path / "log"), "x", sleep=1.2)
        began = time.monotonic()
        done = conveyor.wait(slow, timeout=10)
        waited, returned = time.monotonic() - began, time.time()
        assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == "x"
        assert 1.2 <= waited < 2.5, waited
        if backend_alias != "mysql":
            # Woken when the job ends; looking at growing intervals instead, the look after
            # 1.2 s would come at 1.635 s.
            assert returned - done.finished_at.timestamp() < 0.2

        failed = on(tasks.explode, backend_alias).enqueue("no")
        assert conveyor.wait(failed, timeout=10).status == TaskResultStatus.FAILED
        assert asyncio.run(waited_for(quick)).return_value == 5
        worker.signal()
        assert worker.wait() == 0, worker.output


async def waited_for(result):  # type: ignore[no-untyped-def]
    try:
        return await conveyor.await_result(result, timeout=1)
    finally:  # the thread that waited used this test's databases
        await sync_to_async(connections.close_all)()


def test_wait_gives_up_after_its_timeout(backend_alias):
    never = on(tasks.add, backend_alias).enqueue(1, 1)  # no worker runs it
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"Job {never.id} .* had not finished after 0.3s"):
        conveyor.wait(never, timeout=0.3)
    assert time.monotonic() - began < 1.0
    with pytest.raises(ValueError, match="timeout must be a number"):
        conveyor.wait(never, timeout=-1)
