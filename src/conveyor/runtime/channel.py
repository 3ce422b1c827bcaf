"""What a worker process holds and runs, told to its supervisor through shared memory.

Each child gets a small table of slots, made before the fork. A slot is one delivery the
child holds: its job key and token, and from the moment the task starts, when it started
and until when it may run. The child writes its own table without a system call; the
supervisor reads every table on its tick (to renew exactly those leases) and the table of
a child that died (to count only what was executing). A ``ready`` flag says the child got
through its start-up, and the supervisor stamps each heartbeat that reached the store.

A task that returned leaves a small copy of its success in its slot until the outcome is
saved, so that the supervisor of a child that died can save it instead of running the job
again (a value too large for the slot is not copied: that job runs again).

The supervisor notes in each table when it will next look; a task whose deadline comes
before that wakes it (one byte on its wake-up pipe), so that a limit shorter than the
supervisor's tick is still kept to within milliseconds.

Where claims queue up for one lock of the whole store (SQLite), the processes of a pool
share a ``Claiming`` mark: a process just woken from an idle wait that finds a sibling in the
middle of a claim lets that claim end, rather than racing it for the same jobs.

A held delivery may be *revoked* by the supervisor (when every thread of the child is stuck
in a task, and the child's own watchdog cannot run): under a lock the two processes share,
a delivery is either started by the child or revoked by the supervisor, never both.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext

from conveyor import clock
from conveyor.records import Disposition, Job, Outcome

OUTCOME_BYTES = 1024  # room for one success per slot: its return value and times, as JSON


@dataclass(frozen=True, slots=True)
class Delivery:
    """One slot as the supervisor reads it."""

    index: int
    key: int
    token: str
    started: float  # wall-clock time the task started; 0.0 while only held; < 0 once done
    deadline: float  # when it must end by, on the monotonic clock (system-wide); 0.0: none
    limit: float = 0.0  # its time limit, seconds
    on_limit: float = -1.0  # past the deadline: retry after this many seconds; < 0: fail
    kill_on_stop: bool = False  # at a graceful stop, stop it at once (``sigkill_on_stop``)

    @property
    def executing(self) -> bool:
        return self.started > 0.0


class Claiming:
    """Which process of a pool is claiming, and since when: one mark they all share.

    Woken by the same new job, every idle process would look for it and try to take it;
    on SQLite the losers then queue for the write lock behind the winner, and one that
    slept on the lock takes it again just as the winner saves the job's outcome, which
    then waits a millisecond or more. A process just woken that sees a sibling's claim under
    way waits once, briefly, for it to end (its commit wakes it), then looks.

    The mark is only a hint: two processes may still claim at once, and a mark older than
    ``FRESH`` (its process died mid-claim, or waits on a lock) holds nobody back.
    """

    FRESH = 0.05  # seconds a claim is waited for at most

    def __init__(self, context: BaseContext) -> None:
        self.since = context.RawValue(ctypes.c_double, 0.0)  # monotonic clock; 0.0: none
        self.pid = context.RawValue(ctypes.c_int, 0)

    def begin(self, pid: int) -> None:
        """Process ``pid`` begins a claim."""
        self.pid.value = pid
        self.since.value = time.monotonic()

    def end(self, pid: int) -> None:
        """Process ``pid`` ended its claim."""
        if self.pid.value == pid:
            self.since.value = 0.0

    def by_sibling(self, pid: int) -> bool:
        """Say whether a process other than ``pid`` began a claim that may be under way."""
        since = self.since.value
        return since > 0.0 and time.monotonic() - since < self.FRESH and self.pid.value != pid


class Slots:
    """The shared table of one child; ``size`` is the most deliveries it may hold.

    ``claiming``: the mark the child shares with its siblings, if it has any.
    """

    def __init__(
        self,
        context: BaseContext,
        size: int,
        wake: int | None = None,
        claiming: Claiming | None = None,
    ) -> None:
        self.size = size
        self.wake = wake  # the supervisor's wake-up pipe (write end, non-blocking)
        self.claiming = claiming
        self.keys = context.RawArray(ctypes.c_int64, size)
        self.tokens = context.RawArray(ctypes.c_uint64, size)
        self.started = context.RawArray(ctypes.c_double, size)
        self.deadlines = context.RawArray(ctypes.c_double, size)  # monotonic clock
        self.limits = context.RawArray(ctypes.c_double, size)  # seconds; 0.0 for none
        self.on_limit = context.RawArray(ctypes.c_double, size)
        self.kill_on_stop = context.RawArray(ctypes.c_uint8, size)
        self.cancel = context.RawArray(ctypes.c_uint8, size)  # set: the job was asked to stop
        self.revoked = context.RawArray(ctypes.c_uint8, size)
        self.outcomes = context.RawArray(ctypes.c_char, size * OUTCOME_BYTES)
        self.outcome_sizes = context.RawArray(ctypes.c_uint32, size)
        self.gate = context.Lock()
        self.ready = context.RawValue(ctypes.c_int, 0)
        self.beat = context.RawValue(ctypes.c_double, 0.0)  # 0.0: no supervisor
        self.looks_at = context.RawValue(ctypes.c_double, 0.0)  # the supervisor's next look
        # Child side only: free slots, and which job each used slot holds.
        self._lock = threading.Lock()
        self._free = list(range(size))
        self._jobs: dict[int, Job] = {}

    # --- the child's side ------------------------------------------------------------------

    @property
    def free(self) -> int:
        """How many more deliveries the child may hold."""
        return len(self._free)

    def hold(self, job: Job) -> int:
        """Note a delivery the child now holds; return its slot."""
        with self._lock:
            index = self._free.pop()
            self._jobs[index] = job
        self.tokens[index] = int(job.delivery or "0", 16)
        self.started[index] = 0.0
        self.deadlines[index] = 0.0
        self.revoked[index] = 0
        self.outcome_sizes[index] = 0
        self.cancel[index] = 0
        self.keys[index] = int(job.key)  # written last: a reader sees a whole slot or none
        return index

    def start(
        self,
        index: int,
        limit: float | None = None,
        on_limit: float = -1.0,
        kill_on_stop: bool = False,
    ) -> bool:
        """The task of the delivery in ``index`` starts now; False if it was revoked.

        ``limit``: seconds it may run before the supervisor stops this process; then it is
        retried after ``on_limit`` seconds, or failed if ``on_limit`` is negative.
        ``kill_on_stop``: a graceful stop of the worker stops this process at once.
        """
        with self.gate:
            if self.revoked[index]:
                return False
            now, tick = time.time(), time.monotonic()
            self.deadlines[index] = tick + limit if limit else 0.0
            self.limits[index] = limit or 0.0
            self.on_limit[index] = on_limit
            self.kill_on_stop[index] = kill_on_stop
            self.started[index] = now
        if limit and tick + limit < self.looks_at.value:
            self._wake_supervisor()
        return True

    def _wake_supervisor(self) -> None:
        if self.wake is not None:
            with contextlib.suppress(OSError):  # full: it wakes anyway; gone: nobody to wake
                os.write(self.wake, b"\0")

    def cancel_asked(self, index: int) -> bool:
        """Say whether the job in ``index`` was asked to stop."""
        return bool(self.cancel[index])

    def supervisor_alive(self, within: float) -> bool:
        """Say whether the supervisor reached the store within ``within`` seconds (or none)."""
        stamp = self.beat.value
        return stamp == 0.0 or time.time() - stamp < within

    def finish(self, index: int, outcome: Outcome | None = None) -> None:
        """The task in ``index`` returned; its outcome is not saved yet (never revoked).

        A success small enough is copied into the slot first, for the supervisor to save
        should this process die before it does.
        """
        if outcome is not None and outcome.disposition is Disposition.SUCCEEDED:
            blob = _encode(outcome)
            if blob is not None:
                ctypes.memmove(self._outcome_at(index), blob, len(blob))
                self.outcome_sizes[index] = len(blob)
        self.started[index] = -1.0

    def release(self, index: int) -> None:
        """The delivery in ``index`` is over (recorded or given back)."""
        self.keys[index] = 0  # cleared first, for the same reason
        self.started[index] = 0.0
        with self._lock:
            self._jobs.pop(index, None)
            self._free.append(index)

    def _outcome_at(self, index: int) -> int:
        return ctypes.addressof(self.outcomes) + index * OUTCOME_BYTES

    def mark_ready(self) -> None:
        self.ready.value = 1

    # --- the supervisor's side -------------------------------------------------------------

    def read(self) -> list[Delivery]:
        """Every delivery the child holds now."""
        found = []
        for index in range(self.size):
            key = self.keys[index]
            if key:
                found.append(
                    Delivery(
                        index=index,
                        key=key,
                        token=f"{self.tokens[index]:016x}",
                        started=self.started[index],
                        deadline=self.deadlines[index],
                        limit=self.limits[index],
                        on_limit=self.on_limit[index],
                        kill_on_stop=bool(self.kill_on_stop[index]),
                    )
                )
        return found

    def finished(self) -> dict[tuple[int, str], Outcome]:
        """The successes copied into slots and not saved yet, by (job key, token).

        Read once the child is dead: nothing writes the slots any more.
        """
        found = {}
        for d in self.read():
            size = self.outcome_sizes[d.index]
            if d.started < 0.0 and size:
                outcome = _decode(ctypes.string_at(self._outcome_at(d.index), size))
                if outcome is not None:
                    found[d.key, d.token] = outcome
        return found

    def overrun(self, now: float) -> list[Delivery]:
        """Deliveries still executing past their deadline (``now`` on the monotonic clock)."""
        return [d for d in self.read() if d.executing and 0.0 < d.deadline <= now]

    def ask_to_stop(self, key: int, token: str) -> bool:
        """Tell the task running this delivery it was cancelled; False if it is not here."""
        for index in range(self.size):
            if self.keys[index] == key and f"{self.tokens[index]:016x}" == token:
                self.cancel[index] = 1
                return True
        return False

    def stops_at_once(self) -> bool:
        """Say whether a task running here asked to be stopped at once at a graceful stop."""
        return any(d.executing and d.kill_on_stop for d in self.read())

    def will_look(self, at: float) -> None:
        """The supervisor looks at this table next at ``at`` (monotonic clock), or sooner."""
        self.looks_at.value = at

    def next_deadline(self) -> float:
        """The earliest deadline of a running task (monotonic clock), or 0.0 for none."""
        # Read off the raw columns: the supervisor asks for every child between two starts.
        held = zip(self.keys[:], self.started[:], self.deadlines[:], strict=True)
        return min((d for key, began, d in held if key and began > 0.0 and d > 0.0), default=0.0)

    @property
    def is_ready(self) -> bool:
        return bool(self.ready.value)

    def stamp(self) -> None:
        """The supervisor's heartbeat reached the store now."""
        self.beat.value = time.time()

    def revoke_waiting(self, threads: int, stuck: float) -> list[Delivery]:
        """Revoke the deliveries not started while every thread is stuck for ``stuck`` s.

        Return them: the supervisor gives them back in the store.
        """
        now = time.time()
        with self.gate:
            held = self.read()
            running = [d for d in held if d.executing]
            if len(running) < threads or any(now - d.started < stuck for d in running):
                return []
            waiting = [d for d in held if d.started == 0.0]
            for index in range(self.size):
                if self.keys[index] and self.started[index] == 0.0:
                    self.revoked[index] = 1
        return waiting


def _encode(outcome: Outcome) -> bytes | None:
    """A success as the slot holds it, or None if it does not fit (or is not JSON)."""
    try:
        blob = json.dumps(
            [outcome.return_value, outcome.started_at.timestamp(), outcome.finished_at.timestamp()],
            allow_nan=False,
            separators=(",", ":"),
        ).encode()
    except (TypeError, ValueError):
        return None
    return blob if len(blob) <= OUTCOME_BYTES else None


def _decode(blob: bytes) -> Outcome | None:
    try:
        value, started, finished = json.loads(blob)
        return Outcome(
            started_at=clock.at(started),
            finished_at=clock.at(finished),
            return_value=value,
        )
    except (TypeError, ValueError):
        return None
