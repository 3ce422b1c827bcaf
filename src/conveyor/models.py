"""Conveyor's models, for Django's app registry; they live with the database backend."""

from conveyor.backends.database.models import Job, Schedule, ScheduleFiring, Worker

__all__ = ["Job", "Schedule", "ScheduleFiring", "Worker"]
