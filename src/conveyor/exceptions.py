"""Every error Conveyor raises, rooted at one base class."""

from django.core.exceptions import ImproperlyConfigured
from django.tasks.exceptions import InvalidTask


class ConveyorError(Exception):
    """Base class of every Conveyor error."""


class ConveyorImproperlyConfigured(ConveyorError, ImproperlyConfigured):
    """A setting or backend option is missing or wrong."""


class InvalidTaskArguments(ConveyorError, InvalidTask):
    """A task was enqueued with arguments that cannot be stored as JSON."""


class BackendUnavailable(ConveyorError):
    """The store behind a backend cannot be reached."""


class WorkerLost(ConveyorError):
    """The worker running a job stopped before the job finished."""


class TaskNotFound(ConveyorError):
    """A stored job names a task that cannot be imported."""
