"""Conveyor: a task queue for Django, built as backends for ``django.tasks``."""

from conveyor.bulk import bulk_enqueue, call

__all__ = ["__version__", "bulk_enqueue", "call"]

__version__ = "0.1.0"
