"""Conveyor: a task queue for Django, built as backends for ``django.tasks``."""

from conveyor.bulk import bulk_enqueue, call
from conveyor.context import ConveyorContext
from conveyor.control import CancelOutcome, cancel, progress

__all__ = [
    "CancelOutcome",
    "ConveyorContext",
    "__version__",
    "bulk_enqueue",
    "call",
    "cancel",
    "progress",
]

__version__ = "0.1.0"
