"""Every error Conveyor raises, rooted at one base class."""

from django.core.exceptions import ImproperlyConfigured
from django.tasks.exceptions import InvalidTask


class ConveyorError(Exception):
    """Base class of every Conveyor error."""


class ConveyorImproperlyConfigured(ConveyorError, ImproperlyConfigured):
    """A setting or backend option is missing or wrong."""


class NotMigrated(ConveyorImproperlyConfigured):
    """The database holds no Conveyor tables yet: ``manage.py migrate`` was not run."""


class InvalidTaskArguments(ConveyorError, InvalidTask, TypeError):
    """A task was enqueued with arguments that no store could keep as JSON.

    Also a ``TypeError``, as Django's own backends raise for arguments that are not JSON.
    """


class InvalidTaskOption(ConveyorError, InvalidTask, TypeError):
    """A task was given an option Conveyor does not know, or a value it cannot take."""


class Retry(ConveyorError):
    """Raised by a task to be tried again after ``delay`` seconds.

    It counts as a failed try: the task's ``retries`` bound it, and once they are spent the
    job fails with this error.
    """

    def __init__(self, delay: float | None = None, message: str = "") -> None:
        self.delay = None if delay is None else _delay(delay, "Retry")
        super().__init__(message or (f"retry in {delay}s" if delay is not None else "retry"))


class Snooze(ConveyorError):
    """Raised by a task to run again after ``delay`` seconds, without counting a failure."""

    def __init__(self, delay: float) -> None:
        self.delay = _delay(delay, "Snooze")
        super().__init__(f"snoozed for {delay}s")


def _delay(value: object, name: str) -> float:
    """``value`` as seconds to wait, or a ValueError naming what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}(delay) must be a number of seconds, not {value!r}.")
    if not 0 <= value <= MAX_DELAY:
        raise ValueError(f"{name}(delay) must be from 0 to {MAX_DELAY:g} seconds, not {value!r}.")
    return float(value)


MAX_DELAY = 366 * 86400.0


class SnoozeLimit(ConveyorError):
    """A job run inline (eager mode) snoozed more times than its backend's ``MAX_SNOOZES``."""


class BackendUnavailable(ConveyorError):
    """The store behind a backend cannot be reached."""


class WorkerLost(ConveyorError):
    """The worker running a job stopped before the job finished."""


class TimeLimitExceeded(ConveyorError):
    """A run took longer than its task's ``timeout``: its worker process was stopped."""


class SoftTimeLimitExceeded(ConveyorError):
    """Raised inside a task that ran past its ``soft_timeout``; it may catch it to clean up."""


class Cancelled(ConveyorError):
    """The job was cancelled before it ran."""


class TaskNotFound(ConveyorError):
    """A stored job names a task that cannot be imported."""


class InvalidSchedule(ConveyorError, ValueError):
    """A schedule that cannot be declared or saved; the message names it and what is wrong."""


class ScheduleExists(InvalidSchedule):
    """A schedule of that name is already stored for the backend."""


class ScheduleNotFound(ConveyorError, LookupError):
    """No stored schedule has that name."""


class ScheduleChanged(InvalidSchedule):
    """The schedule was changed by someone else between reading and saving it."""
