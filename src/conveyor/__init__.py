"""Conveyor: a task queue for Django, built as backends for ``django.tasks``."""

from conveyor.bulk import bulk_enqueue, call
from conveyor.context import ConveyorContext
from conveyor.control import CancelOutcome, await_result, cancel, enqueue_again, progress, wait

__all__ = [
    "CancelOutcome",
    "ConveyorContext",
    "__version__",
    "await_result",
    "bulk_enqueue",
    "call",
    "cancel",
    "enqueue_again",
    "progress",
    "wait",
]

__version__ = "0.1.0"
