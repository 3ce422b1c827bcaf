"""Conveyor's models, for Django's app registry; they live with the database backend."""

from conveyor.backends.database.models import (
    Job,
    QueuePause,
    Schedule,
    ScheduleFiring,
    Worker,
)

__all__ = ["Job", "QueuePause", "Schedule", "ScheduleFiring", "Worker"]
