"""Hard time limits and overdue cancels, enforced by the supervisor.

A worker process writes, in its slots, when each task it runs must end. The supervisor
sleeps no longer than the earliest such deadline, and kills a process running a task past
its time limit, or one cancelled and not stopping within ``cancel_grace``: the task's job
gets the outcome it earned (a cancel wins over a time limit, which may be retried), the
process's other jobs are saved or put back uncounted, and another process takes its place.
"""

from __future__ import annotations

import time

from conveyor.backends.base import StoreBackend
from conveyor.records import Outcome
from conveyor.runtime.leases import Leases, cancel_outcome, limit_outcome
from conveyor.runtime.processes import Child, Processes
from conveyor.runtime.registry import Registry


class Deadlines:
    """Watch the deadlines of the tasks a supervisor's processes run."""

    def __init__(
        self, backend: StoreBackend, processes: Processes, leases: Leases, registry: Registry
    ) -> None:
        self.backend = backend
        self.processes = processes
        self.leases = leases
        self.registry = registry

    def until_next(self, timeout: float) -> float:
        """``timeout``, or less if a running task's deadline comes sooner.

        Each child is told when the supervisor will look next before its deadlines are
        read: a task that starts after the read, with an earlier deadline, wakes it.
        """
        now = time.monotonic()
        children = self.processes.children
        for child in children:
            child.slots.will_look(now + timeout)
        deadlines = [d for child in children if (d := child.slots.next_deadline())]
        if not deadlines:
            return timeout
        earliest = max(0.0, min(timeout, min(deadlines) - now))
        for child in children:
            child.slots.will_look(now + earliest)
        return earliest

    def enforce(self) -> None:
        """Stop each child running a task past its time limit, or cancelled and not stopping.

        The child is replaced at once; its other jobs are saved or put back uncounted.
        Every such child is killed before any is recorded: when many tasks reach their
        limits together, none waits for the others' bookkeeping to be stopped.
        """
        now, grace = time.monotonic(), self.backend.conveyor_options.cancel_grace
        overdue = []
        for child in list(self.processes.children):
            pid = child.process.pid
            if pid is None:
                continue
            stopped = self._overdue(child, pid, now, grace)
            if stopped:
                self.processes.signal_kill(pid)
                overdue.append((child, pid, stopped))
        for child, pid, stopped in overdue:
            self._stop(child, pid, stopped)

    def due(self) -> bool:
        """Say whether some running task is past its deadline, or its cancel's grace, now."""
        now, grace = time.monotonic(), self.backend.conveyor_options.cancel_grace
        children = self.processes.children
        if any(0.0 < child.slots.next_deadline() <= now for child in children):
            return True
        asked = self.leases.cancel_asked  # mostly empty: no slot is read then
        return bool(asked) and any(self.leases.overdue_cancels(child, grace) for child in children)

    def _overdue(
        self, child: Child, pid: int, now: float, grace: float
    ) -> dict[tuple[int, str], Outcome]:
        """The outcomes of the deliveries of ``child`` past their time, by (key, token)."""
        # Cancelled and past its limit: the cancel wins (a time limit may be retried).
        stopped = {
            (d.key, d.token): cancel_outcome(d, pid, grace)
            for d in self.leases.overdue_cancels(child, grace)
        }
        for d in child.slots.overrun(now):
            stopped.setdefault((d.key, d.token), limit_outcome(d, pid))
        return stopped

    def _stop(self, child: Child, pid: int, stopped: dict[tuple[int, str], Outcome]) -> None:
        self.processes.kill(child, pid)
        # A task that returned between the look and the kill keeps its own outcome.
        ended = {(d.key, d.token) for d in child.slots.read() if d.started < 0.0}
        self.leases.release_stopped(
            child, {key: outcome for key, outcome in stopped.items() if key not in ended}
        )
        self.registry.end(
            child.worker_id, "stopped: a task ran past its time limit or was cancelled"
        )
        self.processes.replace(child)
