"""A task that notes each run of itself, for counting runs per job (``bench killstorm``).

Every run appends its result id to ``$BENCH_RUNLOG_DIR/<pid>.log`` with one ``write()`` on
an ``O_APPEND`` descriptor: the line is in the kernel before the task returns, so a
SIGKILL a moment later cannot lose it.
"""

import os

from django.tasks import TaskContext, task


@task(backend="conveyor", takes_context=True)
def record_run(context: TaskContext, i: int) -> None:
    """Append this job's id to this process's run log."""
    path = os.path.join(os.environ["BENCH_RUNLOG_DIR"], f"{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{context.task_result.id}\n".encode())
    finally:
        os.close(fd)
