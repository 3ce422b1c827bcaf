"""Tasks the tests enqueue and workers run."""

import asyncio
import os
import time
from pathlib import Path

from django.tasks import TaskContext, task


@task(queue_name="default")
def add(a: int, b: int) -> int:
    return a + b


@task()
def noop() -> None:
    return None


@task(priority=5)
def important(label: str) -> str:
    return label


@task()
def explode(message: str) -> None:
    raise ValueError(message)


@task()
def bad_return() -> object:
    return object()


@task()
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


@task(takes_context=True)
def whoami(context: TaskContext) -> dict:
    result = context.task_result
    return {"id": result.id, "attempt": context.attempt, "worker_ids": result.worker_ids}


@task()
def log_line(path: str, text: str, sleep: float = 0.0) -> str:
    """Append ``text`` to ``path`` (after sleeping); tests count the lines."""
    with Path(path).open("a") as f:
        f.write(f"start {text} {os.getpid()}\n")
        f.flush()
        time.sleep(sleep)
        f.write(f"end {text} {os.getpid()}\n")
    return text


@task(queue_name="emails")
def send_email(to: str) -> str:
    return f"sent to {to}"


def plain_function() -> int:
    """Not a task: a stored job naming it must never run it."""
    return 1


@task()
def fan_out(count: int, backend: str) -> int:
    """Enqueue ``count`` more tasks from inside a task: database writes while workers run."""
    for i in range(count):
        add.using(backend=backend).enqueue(i, count)
    return count


@task()
def exits(code: int) -> None:
    """Calls sys.exit() inside a task: a failure, not a dead worker."""
    import sys

    sys.exit(code)


@task()
def nul_return() -> str:
    """Valid JSON that PostgreSQL's jsonb refuses to store."""
    return "a\x00b"


@task()
def kill_self() -> None:
    """Dies with the process that runs it, as an out-of-memory kill would."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@task()
def run_child_process(path: str) -> int:
    """Start ``sleep 30``, note its pid, wait for it; the test stops it with SIGTERM."""
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    Path(path).write_text(str(child.pid))
    return child.wait()


@task()
def begin_and_leave_open() -> str:
    """Leaves a raw transaction open on the task's connection, and changes its session."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
    return "left open"


@task()
def hold_interpreter(path: str, seconds: float) -> str:
    """Log a start line, then sleep in C without releasing the GIL (a long C call)."""
    import ctypes

    with Path(path).open("a") as f:
        f.write(f"start hold {os.getpid()}\n")
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return "held"


def _tries(path: str) -> int:
    """Count this call in ``path``; return how many calls came before it."""
    with Path(path).open("a+") as f:
        f.seek(0)
        before = len(f.read().splitlines())
        f.write("try\n")
    return before


@task(retries=2, retry_backoff=10, retry_jitter=False)
def fails_twice(path: str) -> str:
    if _tries(path) < 2:
        raise ValueError("not yet")
    return "done"


@task(retries=5, retry_backoff=1, retry_jitter=False, retry_on=[ConnectionError])
def raises(kind: str) -> None:
    import builtins

    raise getattr(builtins, kind)(kind)


@task(retries=5, retry_backoff=1, retry_jitter=False, dont_retry_on=[PermissionError])
def raises_any(kind: str) -> None:
    import builtins

    raise getattr(builtins, kind)(kind)


@task()
def snoozes(path: str, seconds: float) -> str:
    from conveyor.exceptions import Snooze

    if _tries(path) == 0:
        raise Snooze(seconds)
    return "woke"


@task(retries=1)
def asks_to_retry(path: str, seconds: float) -> str:
    from conveyor.exceptions import Retry

    if _tries(path) < 2:
        raise Retry(delay=seconds)
    return "done"


@task(timeout=0.5)
def overruns(path: str, seconds: float) -> str:
    """Note its start in ``path``, then sleep past its half-second time limit."""
    with Path(path).open("a") as f:
        f.write(f"start overrun {os.getpid()}\n")
    time.sleep(seconds)
    return "finished anyway"


@task(timeout=0.2)
def overruns_soon(path: str, seconds: float) -> str:
    """Like ``overruns``, past a limit of a fifth of a second."""
    return overruns.call(path, seconds)


@task(soft_timeout=0.3, timeout=10)
def cleans_up(path: str) -> str:
    """Work in short steps until warned by the soft limit, then note it and stop."""
    from conveyor.exceptions import SoftTimeLimitExceeded

    try:
        for _ in range(500):
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        Path(path).write_text("cleaned up")
        raise
    return "never warned"


def note_outcome(result) -> None:  # type: ignore[no-untyped-def]
    """A hook: note the result in the file its task was given."""
    with Path(result.args[0]).open("a") as f:
        value = result.return_value if result.status == "SUCCESSFUL" else None
        f.write(f"{result.status} {result.id} {value}\n")


def broken_hook(result) -> None:  # type: ignore[no-untyped-def]
    raise RuntimeError("the hook itself is broken")


@task(on_success=note_outcome, on_complete="tests.testapp.tasks.note_outcome")
def hooked(path: str, fail: bool) -> str:
    if fail:
        raise ValueError("asked to fail")
    return "fine"


@task(on_failure=note_outcome, on_complete=broken_hook)
def hooked_on_failure(path: str, fail: bool) -> str:
    if fail:
        raise ValueError("asked to fail")
    return "fine"


@task(sigkill_on_stop=True)
def not_worth_waiting_for(path: str) -> str:
    with Path(path).open("a") as f:
        f.write(f"start {os.getpid()}\n")
    time.sleep(30)
    return "never"


@task(takes_context=True)
def stops_when_cancelled(context: TaskContext, path: str) -> str:
    """Work in steps, reporting progress, until asked to stop."""
    Path(path).write_text("started")
    for step in range(3000):
        context.progress(step, 3000, f"step {step}")  # type: ignore[attr-defined]
        context.raise_if_cancelled()  # type: ignore[attr-defined]
        time.sleep(0.01)
    return "ran to the end"


@task()
def ignores_cancel(path: str) -> str:
    Path(path).write_text("started")
    time.sleep(30)
    return "ran to the end"


@task()
def busy_for(seconds: float) -> str:
    """Keep the interpreter busy for ``seconds`` (no sleep, so no system call to cut)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return "done"


def slow_hook(result) -> None:  # type: ignore[no-untyped-def]
    """A hook that takes its time, then notes the process it ran in."""
    time.sleep(3)
    Path(result.args[0]).write_text(str(os.getpid()))


@task(timeout=0.3, on_failure=slow_hook)
def overruns_with_a_slow_hook(path: str) -> None:
    time.sleep(30)


@task()
def always_snoozes(path: str) -> str:
    from conveyor.exceptions import Snooze

    _tries(path)
    raise Snooze(60)


@task(takes_context=True, retries=3, retry_backoff=60, retry_jitter=False)
def succeeds_on_third(context: TaskContext) -> int:
    """Fail until the third attempt; return the attempt that succeeded."""
    if context.attempt < 3:
        raise ConnectionError(f"attempt {context.attempt}")
    return context.attempt


@task(retries=1, retry_backoff=60, on_complete=note_outcome)
def flaky_hooked(path: str, tries: str) -> str:
    """Fail the first try (counted in ``tries``); the hook notes the outcome in ``path``."""
    if _tries(tries) == 0:
        raise ValueError("first try fails")
    return "fine"


@task(result_ttl=3600)
def kept_an_hour(n: int, fail: bool = False) -> int:
    if fail:
        raise ValueError(f"run {n} failed")
    return n


@task(keep_last=3)
def keep_three(n: int, fail: bool = False) -> int:
    if fail:
        raise ValueError(f"run {n} failed")
    return n


@task(unique=True)
def unique_add(a: int, b: int) -> int:
    return a + b


def account_of(account: int, **_: object) -> int:
    return account


@task(unique_key=account_of)
def sync_account(account: int, note: str = "") -> str:
    return note


@task(unique_key=account_of, unique_states="queued")
def refresh_account(account: int, note: str = "") -> str:
    return note


@task(unique=True, unique_states="successful", unique_for=3600)
def hourly_report(name: str) -> str:
    return f"report {name}"


@task(unique=True, unique_for=60)
def debounced(name: str) -> str:
    return name


def key_that_raises(*args: object, **kwargs: object) -> object:
    raise LookupError("no account given")


def key_that_is_not_json(*args: object, **kwargs: object) -> object:
    return {"accounts": {1, 2}}


@task(unique_key=key_that_raises)
def bad_key(account: int) -> None:
    return None


@task(unique_key=key_that_is_not_json)
def unjson_key(account: int) -> None:
    return None


@task(unique_key=account_of, unique_for=60)
def debounced_account(account: int, note: str = "") -> str:
    return note


@task()
def scheduled_report(label: str, due: str = "") -> str:
    return f"{label}@{due}"


@task(takes_context=True)
def scheduled_line(context: TaskContext, path: str, label: str, due: str = "") -> str:
    """Append ``label due job-id`` to ``path``: the runs schedules fired, as workers ran them."""
    with Path(path).open("a") as f:
        f.write(f"{label} {due} {context.task_result.id}\n")
    return label


# --- a code schedule, synced by workers at start-up (tests/acceptance/test_schedule_sync.py) ---

from django.conf import settings  # noqa: E402

from conveyor.schedules import schedule  # noqa: E402


@task()
def manual_ping(label: str) -> str:
    """Run by the code schedule "testapp-manual": it has no timetable, so only on demand."""
    return label


# Declared on each database backend the tests have, so that a worker of any engine syncs it.
for _alias in ("default", "postgres", "mysql"):
    if _alias in settings.TASKS:
        schedule("testapp-manual", args=["manual"], backend=_alias)(manual_ping)


@task(takes_context=True)
def reports_progress(context: TaskContext, path: str, steps: int = 600) -> int:
    """Work in steps of a tenth of a second, reporting each, until ``path`` exists."""
    for step in range(1, steps + 1):
        context.progress(step, steps, f"step {step}")  # type: ignore[attr-defined]
        if Path(path).exists():
            return step
        time.sleep(0.1)
    return steps


class Unprintable(Exception):
    """An error whose message cannot be made: printing it raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


@task()
def raises_unprintable() -> None:
    raise Unprintable()


@task()
def closes_connections(seconds: float) -> str:
    """Close this thread's idle database connections, as many task bodies do, then sleep."""
    from django.db import close_old_connections

    close_old_connections()
    time.sleep(seconds)
    return "slept"


@task()
def runs_schedule(name: str, backend: str) -> str:
    """Start a run of the schedule ``name`` now, from inside a task."""
    from conveyor import schedules

    schedules.run(name, backend=backend)
    return "ran"
