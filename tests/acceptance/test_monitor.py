"""``manage.py conveyor monitor`` in a real terminal, while a real worker runs a slow task."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.helpers import Terminal, Worker, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance

TASK = "tests.testapp.tasks.reports_progress"


def test_the_live_view_shows_the_running_job_and_its_progress(backend_alias, tmp_path: Path):
    stop = tmp_path / "stop"
    result = on(tasks.reports_progress, backend_alias).enqueue(str(stop))
    with Worker(backend_alias, "--processes", "1") as worker:
        with Terminal(
            "conveyor", "monitor", "--backend", backend_alias, "--interval", "0.2"
        ) as terminal:

            def shows_progress() -> bool:
                screen = terminal.screen()
                return TASK in screen and bool(re.search(r"\b\d+/600 \d+% step \d+", screen))

            wait_for(shows_progress, timeout=30)
            screen = terminal.screen()
            assert re.search(r"Workers \([1-9]\d* online\)", screen), screen
            assert re.search(r"Running \(1\)", screen), screen
            terminal.type(b"\x03")  # Ctrl-C
            assert terminal.wait() == 0, terminal.screen()
            assert "Traceback" not in terminal.output
            assert terminal.output.rstrip().endswith("\x1b[?1049l")  # the screen is put back
        stop.touch()
        wait_for(lambda: result.refresh() or result.is_finished, timeout=30)
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_view_with_status_zero(backend_alias, signum: int):
    with Terminal("conveyor", "monitor", "--backend", backend_alias, "--interval", "0.2") as term:
        wait_for(lambda: "Ctrl-C to quit" in term.screen(), timeout=30)
        term.proc.send_signal(signum)
        assert term.wait() == 0, term.screen()
        assert "Traceback" not in term.output
        assert term.output.rstrip().endswith("\x1b[?1049l")
