"""Turn queue statistics into something a person reads."""

from __future__ import annotations

from typing import Any, Protocol

from conveyor.records import QueueStats


class Writer(Protocol):
    def write(self, text: str, /) -> Any: ...


COLUMNS = ("ready", "scheduled", "running", "successful", "failed")


def render_stats(stats: QueueStats, alias: str, out: Writer) -> None:
    """Write a table of job counts per queue, with totals."""
    width = max([5, *(len(name) for name in stats.by_queue)])
    out.write(f"Backend {alias!r}\n")
    out.write("queue".ljust(width) + "".join(c.rjust(12) for c in COLUMNS) + "\n")
    for name, counts in sorted(stats.by_queue.items()):
        out.write(name.ljust(width) + "".join(str(counts[c]).rjust(12) for c in COLUMNS) + "\n")
    totals = [getattr(stats, c) for c in COLUMNS]
    out.write("total".ljust(width) + "".join(str(t).rjust(12) for t in totals) + "\n")
