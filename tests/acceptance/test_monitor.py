"""``manage.py conveyor monitor`` in a real terminal, while a real worker runs a slow task."""

from __future__ import annotations

import io
import os
import re
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from rich.console import Console
from rich.text import Text

from tests.helpers import ESCAPES, Terminal, Worker, on, wait_for
from tests.testapp import tasks

pytestmark = pytest.mark.acceptance

TASK = "tests.testapp.tasks.reports_progress"


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the view is kept as a picture: ``CONVEYOR_SCREENSHOTS`` if set (the README's)."""
    kept = os.environ.get("CONVEYOR_SCREENSHOTS")
    return Path(kept) if kept else tmp_path


def screenshot(frame: str, path: Path) -> None:
    """Keep a frame the terminal showed as an SVG picture, colours and all."""
    console = Console(record=True, width=200, file=io.StringIO(), force_terminal=True)
    lines = frame.splitlines()
    while lines and not ESCAPES.sub("", lines[-1]).strip():
        lines.pop()  # the empty rows under the view
    console.print(Text.from_ansi("\n".join(lines)), end="")
    console.save_svg(str(path), title="manage.py conveyor monitor")
    assert path.stat().st_size > 1000


def test_the_live_view_shows_the_running_job_and_its_progress(
    backend_alias, tmp_path: Path, screenshots: Path
):
    stop = tmp_path / "stop"
    for word in ("timeout", "refused"):  # two failures to list
        on(tasks.explode, backend_alias).enqueue(f"upstream {word}")
    later = timezone.now() + timedelta(hours=1)
    for i in range(3):  # jobs due later, counted as scheduled
        on(tasks.add, backend_alias, run_after=later).enqueue(i, i)
    result = on(tasks.reports_progress, backend_alias).enqueue(str(stop))
    with Worker(backend_alias, "--processes", "1") as worker:
        with Terminal(
            "conveyor", "monitor", "--backend", backend_alias, "--interval", "0.2"
        ) as terminal:

            def shows_progress() -> bool:
                screen = terminal.screen()
                progress = re.search(r"\b\d+/600 \d+% step \d+", screen)
                return TASK in screen and bool(progress) and screen.count("upstream") == 2

            wait_for(shows_progress, timeout=30)
            screenshot(terminal.frame(), screenshots / f"monitor-{backend_alias}.svg")
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
