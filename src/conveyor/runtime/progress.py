"""A progress bar and closing summary for a worker run (``--progress``)."""

from __future__ import annotations

import time

from django.utils import timezone
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from conveyor.backends.base import StoreBackend
from conveyor.records import QueueSelector, QueueStats

REFRESH = 0.25


class Progress:
    """Draw how many jobs have finished out of those there were, from backend stats."""

    def __init__(
        self, backend: StoreBackend, queues: QueueSelector, console: Console | None = None
    ) -> None:
        self.backend = backend
        self.queues = queues
        self.console = console or Console(stderr=True)
        # Finished jobs are counted from now on only: a count that stays small however
        # many finished jobs the table keeps.
        self.since = timezone.now()
        self.first = self.last = self._stats()
        self.started = time.monotonic()
        self.next_draw = 0.0
        self.bar = RichProgress(
            TextColumn("[bold]conveyor[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.0f} tasks/s  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,
            transient=False,
        )
        self.bar_id = self.bar.add_task("jobs", total=self.first.pending, rate=0.0, failed=0)
        self.bar.start()

    def update(self, force: bool = False) -> None:
        """Redraw, at most every quarter second."""
        now = time.monotonic()
        if not force and now < self.next_draw:
            return
        self.next_draw = now + REFRESH
        self.last = self._stats()
        done = self.done(self.last)
        elapsed = max(now - self.started, 1e-9)
        self.bar.update(
            self.bar_id,
            completed=done,
            total=done + self.last.pending,
            rate=done / elapsed,
            failed=self.last.failed - self.first.failed,
        )
        self.bar.refresh()

    def _stats(self) -> QueueStats:
        return self.backend.stats(self.queues, finished_since=self.since)

    def done(self, stats: QueueStats) -> int:
        """Jobs finished since the run started."""
        return stats.finished - self.first.finished

    def finish(self) -> None:
        """Draw the last state and print the summary."""
        self.update(force=True)
        self.bar.stop()
        elapsed = time.monotonic() - self.started
        done = self.done(self.last)
        succeeded = self.last.successful - self.first.successful
        failed = self.last.failed - self.first.failed
        self.console.print(
            f"[bold]Done:[/] {done} tasks in {elapsed:.2f}s ({done / max(elapsed, 1e-9):.0f}/s)"
            f": [green]{succeeded} succeeded[/], [red]{failed} failed[/], "
            f"{self.last.pending} pending."
        )
