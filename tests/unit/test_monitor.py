"""The live view: a snapshot drawn (escaped, whatever the names), and the loop around it."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError
from django.tasks import task_backends
from django.tasks.base import TaskError
from rich.console import Console

from conveyor import schedules
from conveyor.backends.memory import MemoryBackend
from conveyor.cron import Timetable
from conveyor.monitor import LOOKBACK, Monitor, Watcher
from conveyor.monitoring import Snapshot, duration, progress, render, seconds
from conveyor.records import (
    FailedJob,
    Outcome,
    PickupLatency,
    QueueSelector,
    QueueStats,
    RunningJob,
    ScheduleInfo,
    ScheduleSpec,
    WorkerInfo,
)
from conveyor.testing import store_clock
from tests.helpers import on
from tests.testapp import tasks

NOW = datetime(2030, 5, 6, 12, 0, 0, tzinfo=UTC)
EVIL = "a\x1b[2Jb[bold]c[/]\u202ed"  # clears the screen, markup, a bidi override
SHOWN = "a\\x1b[2Jb[bold]c[/]\\u202ed"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # the colours rich itself writes
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom\n")


def _text(renderable: Any, width: int = 160, colour: bool = False) -> str:
    out = StringIO()
    console = Console(
        file=out,
        width=width,
        force_terminal=colour,
        color_system="truecolor" if colour else None,
    )
    console.print(renderable)
    return out.getvalue()


def _counts(**counts: int) -> dict[str, int]:
    return {name: counts.get(name, 0) for name in STATES}


STATES = ("ready", "scheduled", "running", "successful", "failed")


def _snapshot(**changes: Any) -> Snapshot:
    stats = QueueStats(
        ready=5,
        running=2,
        successful=120,
        failed=3,
        by_queue={
            "default": _counts(ready=4, running=2, successful=100, failed=3),
            "emails": _counts(ready=1, successful=20),
        },
    )
    snapshot = Snapshot(
        backend="default",
        taken_at=NOW,
        checked_at=NOW,
        interval=2.0,
        lease=30.0,
        queues=("default", "emails", "reports"),
        stats=stats,
        workers=(
            WorkerInfo(
                id="host:10:aaaa",
                backend="default",
                kind="process",
                host="host",
                pid=10,
                queues="*",
                last_beat_at=NOW - timedelta(seconds=4),
            ),
            WorkerInfo(
                id="host:11:bbbb",
                backend="default",
                kind="process",
                host="host",
                pid=11,
                last_beat_at=NOW - timedelta(minutes=5),
            ),
        ),
        running=(
            RunningJob(
                id="1",
                task_path="shop.tasks.rebuild_index",
                queue_name="default",
                worker_id="host:10:aaaa",
                attempt=2,
                enqueued_at=NOW - timedelta(minutes=3),
                started_at=NOW - timedelta(seconds=75),
                progress={"done": 3, "total": 10, "message": "step 3"},
            ),
            RunningJob(
                id="2",
                task_path="shop.tasks.send_mail",
                queue_name="default",
                worker_id="host:10:aaaa",
                attempt=1,
                enqueued_at=NOW,
            ),
        ),
        failures=(
            FailedJob(
                id="3",
                task_path="shop.tasks.charge",
                queue_name="default",
                finished_at=NOW - timedelta(seconds=42),
                attempt=1,
                error_class="builtins.ValueError",
                message="ValueError: card declined",
            ),
        ),
        latency=PickupLatency(samples=40, p50=0.25, p95=3.5, longest=12.0),
        schedules=(
            ScheduleInfo(
                spec=ScheduleSpec(
                    name="nightly-report",
                    task_path="shop.tasks.report",
                    timetable=Timetable(kind="cron", cron="0 2 * * *", timezone="UTC"),
                ),
                backend="default",
                next_run_at=NOW + timedelta(hours=14),
                last_run_at=NOW - timedelta(hours=10),
            ),
        ),
    )
    return replace(snapshot, **changes)


# --- drawing a snapshot ---------------------------------------------------------------------


def test_every_panel_is_drawn():
    text = _text(render(_snapshot()))
    assert "backend default" in text and "Ctrl-C to quit" in text
    # Queues, with last minute's rates; an empty configured queue is listed too.
    assert re.search(r"default\s+4\s+0\s+2\s+100\s+3", text)
    assert re.search(r"reports\s+0\s+0\s+0\s+0\s+0", text)
    assert re.search(r"total\s+5\s+0\s+2\s+120\s+3", text)
    assert re.search(r"succeeded / min\s+120", text) and re.search(r"failed / min\s+3", text)
    assert re.search(r"pickup latency p50\s+250 ms", text)
    assert re.search(r"pickup latency p95\s+3.5s", text)
    # Running jobs: task, worker, how long, try, progress; one not started yet.
    assert re.search(r"shop.tasks.rebuild_index\s+default\s+host:10:aaaa\s+1m 15s\s+2", text)
    assert "3/10 30% step 3" in text
    assert re.search(r"shop.tasks.send_mail .*starting", text)
    # Workers: the one that stopped beating a lease ago is not online.
    assert "Workers (1 online, 1 not)" in text
    assert re.search(r"host:10:aaaa\s+process\s+host\s+10\s+\*\s+4.0s ago\s+yes", text)
    assert re.search(r"host:11:bbbb .*5m 00s ago\s+no", text)
    # Failures and schedules.
    assert re.search(r"42s ago\s+shop.tasks.charge\s+ValueError\s+ValueError: card declined", text)
    assert re.search(r"nightly-report\s+in 14h 00m\s+10h 00m ago\s+active", text)


def test_names_cannot_drive_the_terminal_or_read_as_markup():
    evil = _snapshot(
        backend=EVIL,
        queues=(EVIL,),
        stats=QueueStats(ready=1, by_queue={EVIL: _counts(ready=1)}),
        workers=(WorkerInfo(id=EVIL, backend="x", kind=EVIL, host=EVIL, pid=1, queues=EVIL),),
        running=(
            RunningJob(
                id="1",
                task_path=EVIL,
                queue_name=EVIL,
                worker_id=EVIL,
                attempt=1,
                enqueued_at=NOW,
                progress={"done": 1, "total": 2, "message": EVIL},
            ),
        ),
        failures=(
            FailedJob(
                id="2",
                task_path=EVIL,
                queue_name=EVIL,
                finished_at=NOW,
                attempt=1,
                error_class=EVIL,
                message=EVIL,
            ),
        ),
        schedules=(),
        error=EVIL,
    )
    text = _text(render(evil), width=400, colour=True)
    assert "\x1b" not in SGR.sub("", text)  # only the colours rich writes itself
    assert "\u202e" not in text
    plain = _text(render(evil), width=400)
    assert plain.count(SHOWN) >= 10  # each name as written, markup and all


def test_a_store_that_cannot_be_reached_is_said_so():
    text = _text(render(_snapshot(error="OperationalError: connection refused")))
    assert "Cannot reach the store: OperationalError: connection refused" in text
    assert "retrying every 2.0s; last read 12:00:00" in text
    assert "shop.tasks.rebuild_index" in text  # what was last read stays on screen
    first = Snapshot(backend="default", taken_at=None, checked_at=NOW, interval=5, lease=30)
    text = _text(render(replace(first, error="OperationalError: no")))
    assert "nothing read yet" in text and "Traceback" not in text


def test_more_running_jobs_than_shown_are_counted():
    stats = replace(_snapshot().stats, running=25)
    assert "and 23 more" in _text(render(_snapshot(stats=stats)))


def test_workers_online_come_first_and_a_long_list_is_cut():
    gone = [
        WorkerInfo(id=f"a-gone:{i}", backend="default", kind="process", host="old", pid=i)
        for i in range(25)
    ]
    alive = WorkerInfo(
        id="z-alive", backend="default", kind="process", host="new", pid=1, last_beat_at=NOW
    )
    text = _text(render(_snapshot(workers=(*gone, alive))))
    assert "Workers (1 online, 25 not)" in text and "and 6 more" in text
    assert text.index("z-alive") < text.index("a-gone:0")


def test_a_narrow_screen_puts_the_tables_one_under_another():
    text = _text(render(_snapshot()), width=80)
    assert "3/10 30%" in text and "shop.tasks.send_mail" in text
    queues = next(i for i, line in enumerate(text.splitlines()) if line.startswith("Queues"))
    assert "Last minute" not in text.splitlines()[queues]
    assert max(len(line) for line in text.splitlines()) <= 80


def test_progress_as_reported():
    assert progress(None).plain == ""
    assert progress({"done": 3, "total": 10, "message": "x"}).plain == "3/10 30% x"
    assert progress({"done": 2.5, "total": None, "message": ""}).plain == "2.5"
    assert progress({"done": 0, "total": 0, "message": "empty"}).plain == "0 empty"
    assert progress({"done": "a lot", "message": "odd"}).plain == " odd"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-3, "0.0s"),
        (0.42, "0.4s"),
        (12.7, "12s"),
        (65, "1m 05s"),
        (7380, "2h 03m"),
        (3 * 86400 + 4 * 3600, "3d 04h"),
    ],
)
def test_durations(value: float, shown: str):
    assert duration(value) == shown


def test_latencies():
    assert seconds(None) == "-"
    assert seconds(0.0123) == "12 ms"
    assert seconds(2.5) == "2.5s"


def test_percentiles_are_nearest_rank():
    assert PickupLatency.of([]) == PickupLatency()
    assert PickupLatency.of([5.0]) == PickupLatency(samples=1, p50=5.0, p95=5.0, longest=5.0)
    assert PickupLatency.of([3.0, 1.0, 2.0, 4.0]).p50 == 2.0
    assert PickupLatency.of([-0.2, 1.0]).p50 == 0.0  # a clock a little behind
    assert PickupLatency.of(float(i) for i in range(1, 101)).p95 == 95.0


# --- reading snapshots ---------------------------------------------------------------------


@pytest.fixture
def memory() -> Any:
    backend = task_backends["memory"]
    backend.clear()
    yield backend
    backend.clear()


class Unreachable(MemoryBackend):
    """The in-process store, made to fail as a database that went away does."""

    down = False

    def stats(self, *args: Any, **kwargs: Any) -> QueueStats:
        if self.down:
            raise OperationalError("connection to server failed: Connection refused\n\tIs it up?")
        return super().stats(*args, **kwargs)


def _unreachable() -> Unreachable:
    entry = task_backends["memory"]
    return Unreachable("memory", {"QUEUES": sorted(entry.queues), "OPTIONS": {}})


def test_a_look_reads_every_panel_from_the_store(memory):
    on(tasks.add, "memory").enqueue(1, 1)
    on(tasks.send_email, "memory").enqueue("a@example.com")
    running, failing = memory.claim("host:1:x", QueueSelector(), 2)
    memory.report_progress(running, {"done": 1, "total": 4, "message": "one"})
    memory.fail(failing, Outcome(started_at=NOW, finished_at=_now(), error=BOOM))
    memory.register_worker(
        WorkerInfo(id="host:1:x", backend="memory", kind="process", host="host", pid=1)
    )
    schedules.create("tick", tasks.noop, every=60, backend="memory")

    look = Watcher(memory, QueueSelector(), 2.0).look()
    assert look.error == "" and look.taken_at is not None
    assert look.queues == ("default", "emails", "reports")
    assert look.stats.running == 1 and look.stats.failed == 1
    assert [w.id for w in look.workers] == ["host:1:x"]
    assert [r.id for r in look.running] == [running.id]
    assert [f.id for f in look.failures] == [failing.id]
    assert [s.name for s in look.schedules] == ["tick"]
    assert "1/4 25% one" in _text(render(look))


def test_queue_options_narrow_what_is_read(memory):
    on(tasks.add, "memory").enqueue(1, 1)
    on(tasks.send_email, "memory").enqueue("a@example.com")
    memory.claim("w", QueueSelector(), 2)
    emails = QueueSelector(include=frozenset({"emails"}))
    look = Watcher(memory, emails, 2.0).look()
    assert look.queues == ("emails",)
    assert [r.queue_name for r in look.running] == ["emails"]
    assert "queues emails" in _text(render(look))


def test_failures_are_kept_between_looks_and_read_anew_only_lately(memory):
    watcher = Watcher(memory, QueueSelector(), 2.0)
    with store_clock() as clock:
        on(tasks.add, "memory").enqueue(1, 1)
        [first] = memory.claim("w", QueueSelector(), 1)
        memory.fail(first, Outcome(started_at=_now(), finished_at=_now(), error=BOOM))
        assert [f.id for f in watcher.look().failures] == [first.id]
        clock.advance(600)
        on(tasks.add, "memory").enqueue(2, 2)
        [second] = memory.claim("w", QueueSelector(), 1)
        memory.fail(second, Outcome(started_at=_now(), finished_at=_now(), error=BOOM))
        asked: list[datetime] = []
        real = memory.recent_failures

        def spy(since: datetime, *args: Any, **kwargs: Any) -> list[FailedJob]:
            asked.append(since)
            return real(since, *args, **kwargs)

        memory.recent_failures = spy
        try:
            look = watcher.look()
        finally:
            del memory.recent_failures
        assert [f.id for f in look.failures] == [second.id, first.id]
        assert _now() - asked[0] < timedelta(seconds=700)  # not the whole hour again
        clock.advance(LOOKBACK - 300)  # the first failed over an hour ago
        assert [f.id for f in watcher.look().failures] == [second.id]


def test_a_store_that_went_away_is_said_so_and_tried_again(memory):
    backend = _unreachable()
    on(tasks.add, "memory").enqueue(1, 1)
    watcher = Watcher(backend, QueueSelector(), 2.0)
    good = watcher.look()
    backend.down = True
    bad = watcher.look()
    assert bad.error == "OperationalError: connection to server failed: Connection refused"
    assert bad.stats == good.stats and bad.taken_at == good.taken_at
    backend.down = False
    assert watcher.look().error == ""


def test_once_prints_one_view(memory):
    out = StringIO()
    code = Monitor(memory, QueueSelector(), once=True, console=Console(file=out, width=120)).run()
    assert code == 0 and out.getvalue().count("Ctrl-C to quit") == 1


def test_once_on_a_store_that_cannot_be_reached_says_so_and_fails():
    backend = _unreachable()
    backend.down = True
    out = StringIO()
    code = Monitor(backend, QueueSelector(), once=True, console=Console(file=out, width=120)).run()
    assert code == 1
    assert "Cannot reach the store: OperationalError" in out.getvalue()
    assert "Traceback" not in out.getvalue()


def _stop_after(frames: int) -> Any:
    """A sleep that lets ``frames`` frames be drawn, then acts as Ctrl-C."""
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) >= frames:
            raise KeyboardInterrupt

    return sleep


def test_ctrl_c_ends_the_live_view_and_puts_the_screen_back(memory):
    out = StringIO()
    console = Console(file=out, width=120, height=40, force_terminal=True)
    monitor = Monitor(memory, QueueSelector(), interval=0.5, console=console, sleep=_stop_after(3))
    assert monitor.run() == 0
    text = out.getvalue()
    assert text.count("Ctrl-C to quit") == 3
    assert "\x1b[?1049h" in text and text.rstrip().endswith("\x1b[?1049l")  # alternate screen


def test_into_a_file_each_look_is_printed_after_the_last(memory):
    out = StringIO()
    monitor = Monitor(memory, QueueSelector(), console=Console(file=out), sleep=_stop_after(2))
    assert monitor.run() == 0
    assert out.getvalue().count("Ctrl-C to quit") == 2 and "\x1b" not in out.getvalue()


# --- the command ---------------------------------------------------------------------------


def test_the_command_prints_one_view(memory):
    on(tasks.add, "memory").enqueue(1, 1)
    out = StringIO()
    call_command("conveyor", "monitor", "--backend", "memory", "--once", stdout=out)
    assert "Queues" in out.getvalue() and "Running (0)" in out.getvalue()


@pytest.mark.parametrize("value", ["0", "0.05", "-1", "nan", "inf", "3601", "soon"])
def test_the_interval_is_checked(value: str):
    with pytest.raises(CommandError, match="argument --interval: must be a number"):
        call_command("conveyor", "monitor", f"--interval={value}", "--once")


def test_unknown_queues_are_refused():
    with pytest.raises(CommandError, match="Unknown queue"):
        call_command("conveyor", "monitor", "--backend", "memory", "--queue", "nope", "--once")


def _now() -> datetime:
    from conveyor import clock

    return clock.now()
