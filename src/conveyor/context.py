"""What a task that ``takes_context`` can ask of the worker running it.

``ConveyorContext`` is Django's ``TaskContext`` with two more calls: ``cancelled()`` (was
this job asked to stop?) and ``progress(done, total, message)`` (saved a few times a second
at most, and readable with ``conveyor.progress(result)``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.tasks import TaskContext

from conveyor.exceptions import Cancelled

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 0.25  # seconds between two saves of a task's progress


def _never() -> bool:
    return False


def _nowhere(progress: dict[str, Any]) -> None:
    return None


# Django's TaskContext is a frozen dataclass; its type stubs do not say so.
@dataclass(frozen=True, slots=True, kw_only=True)
class ConveyorContext(TaskContext):  # type: ignore[misc]
    """The context of one run: Django's, plus cancel checks and progress reports."""

    is_cancelled: Callable[[], bool] = field(default=_never, repr=False)
    save_progress: Callable[[dict[str, Any]], None] = field(default=_nowhere, repr=False)
    _last: list[float] = field(default_factory=lambda: [0.0], repr=False)

    def cancelled(self) -> bool:
        """Say whether this job was asked to stop (``conveyor.cancel``).

        A task that checks it can stop cleanly: raise ``Cancelled`` (or call
        ``raise_if_cancelled()``) and the job ends cancelled. One that never checks is
        stopped by its worker after the backend's ``CANCEL_GRACE``.
        """
        return self.is_cancelled()

    def raise_if_cancelled(self) -> None:
        """Raise ``Cancelled`` if this job was asked to stop."""
        if self.is_cancelled():
            raise Cancelled("the job was cancelled while it ran")

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report progress; saved at most every ``PROGRESS_EVERY`` seconds, and at the end."""
        for name, value in (("done", done), ("total", total)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"progress {name} must be a finite number, not {value!r}.")
        if not isinstance(message, str):
            raise ValueError(f"progress message must be a string, not {message!r}.")
        now = time.monotonic()
        last = total is not None and done >= total
        if not last and now - self._last[0] < PROGRESS_EVERY:
            return
        self._last[0] = now
        clean = message.replace("\x00", "").encode("utf-8", "replace").decode()[:500]
        try:
            self.save_progress({"done": done, "total": total, "message": clean})
        except Exception as e:  # a report must never fail the task
            logger.warning("Could not save the progress of job %s: %s", self.task_result.id, e)
