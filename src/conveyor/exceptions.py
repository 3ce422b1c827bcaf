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


class BackendUnavailable(ConveyorError):
    """The store behind a backend cannot be reached."""


class WorkerLost(ConveyorError):
    """The worker running a job stopped before the job finished."""


class Cancelled(ConveyorError):
    """The job was cancelled before it ran."""


class TaskNotFound(ConveyorError):
    """A stored job names a task that cannot be imported."""
