"""The worker's metrics endpoint, in this process: its directory, its lock, its forks."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conveyor.runtime import exporter
from conveyor.runtime.exporter import LOCK, PREFIX, Exporter

pytestmark = pytest.mark.django_db


@pytest.fixture
def metrics_dir(tmp_path, settings) -> Path:
    settings.CONVEYOR_METRICS_DIR = str(tmp_path)
    return tmp_path


def test_each_supervisor_writes_to_a_directory_of_its_own_and_removes_it(metrics_dir):
    first = Exporter("default", "127.0.0.1", 0)
    second = Exporter("default", "127.0.0.1", 0)  # another worker sharing the setting
    try:
        assert first.directory != second.directory
        assert {Path(e.directory).parent for e in (first, second)} == {metrics_dir}
        with urllib.request.urlopen(f"http://127.0.0.1:{first.port}/metrics") as response:
            assert b"conveyor_store_up" in response.read()
    finally:
        second.close()
        first.close()
    assert list(metrics_dir.iterdir()) == []
    assert exporter.identity() == str(os.getpid())  # put back as it was


def test_a_directory_no_process_holds_is_removed_and_one_in_use_is_kept(metrics_dir):
    gone = metrics_dir / f"{PREFIX}999999-abc"
    gone.mkdir()
    (gone / "counter_process-1.db").write_bytes(b"\0" * 16)
    old_style = metrics_dir / f"{PREFIX}x1y2"
    old_style.mkdir()
    used = metrics_dir / f"{PREFIX}12345-def"
    used.mkdir()
    fresh = metrics_dir / f"{PREFIX}424242-new"  # made a moment ago by a supervisor starting
    fresh.mkdir()
    long_ago = time.time() - 3600
    for path in (gone, old_style, used):
        os.utime(path, (long_ago, long_ago))
    held = os.open(used / LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the supervisor that uses it does
    try:
        started = Exporter("default", "127.0.0.1", 0)
        started.close()
        assert not gone.exists() and not old_style.exists()
        assert used.exists() and fresh.exists()
    finally:
        os.close(held)


def test_a_fork_is_put_off_while_a_scrape_reads_the_store(metrics_dir):
    started = Exporter("default", "127.0.0.1", 0)
    try:
        with exporter.forking() as free:
            assert free
        reading = threading.Event()
        done = threading.Event()

        def scrape() -> None:
            with started.lock:  # what a scrape holds while it reads the store
                reading.set()
                done.wait(5)

        thread = threading.Thread(target=scrape)
        thread.start()
        reading.wait(5)
        began = time.monotonic()
        with exporter.forking() as free:
            assert not free
        assert time.monotonic() - began < 1  # the supervisor does not wait for the store
        done.set()
        thread.join()
        with exporter.forking() as free:
            assert free
    finally:
        started.close()
    with exporter.forking() as free:  # no endpoint: forks go ahead
        assert free
