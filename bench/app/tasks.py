"""The same no-op task, once for each backend under test."""

from django.tasks import task


@task(backend="conveyor")
def noop_conveyor(i: int) -> None:
    """Do nothing: the benchmark measures the queue, not the work."""
    return None


@task(backend="tasksdb")
def noop_tasksdb(i: int) -> None:
    """Do nothing: the benchmark measures the queue, not the work."""
    return None
