"""Tasks that note each run of themselves, for counting runs per job.

Every run appends its result id to ``$BENCH_RUNLOG_DIR/<pid>.log`` with one ``write()`` on
an ``O_APPEND`` descriptor: the line is in the kernel before the task goes on, so a
SIGKILL a moment later cannot lose it. ``record_run`` only does that (``bench killstorm``,
``bench timeouts``); ``overrun`` then sleeps far past its hard time limit
(``bench timeouts``).
"""

import os
import time

from django.tasks import TaskContext, task

LIMIT = 1.0  # overrun's hard time limit, seconds


def note_run(context: TaskContext) -> None:
    """Append this job's id to this process's run log."""
    path = os.path.join(os.environ["BENCH_RUNLOG_DIR"], f"{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{context.task_result.id}\n".encode())
    finally:
        os.close(fd)


@task(backend="conveyor", takes_context=True)
def record_run(context: TaskContext, i: int) -> None:
    """Note this run, and return."""
    note_run(context)


# django-stubs types @task with Django's own arguments only; Conveyor's task_class takes more.
@task(backend="conveyor", takes_context=True, timeout=LIMIT)  # type: ignore[call-overload]
def overrun(context: TaskContext, i: int, seconds: float) -> None:
    """Note this run, then sleep ``seconds``: the worker must stop it at its limit."""
    note_run(context)
    time.sleep(seconds)
