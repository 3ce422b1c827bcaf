"""What a task says beyond Django's own fields: Conveyor's ``task_class`` and its policies.

``@task(retries=3, retry_on=[ConnectionError])`` on a Conveyor backend builds a
``ConveyorTask``: Django's ``Task`` with Conveyor's options as fields, validated when the task
is defined (or changed with ``.using(...)``). A field left at ``None`` takes the backend's
default from ``TASKS[alias]["OPTIONS"]``. At enqueue the options that apply are resolved and
stored with the job, so a deploy that changes a task's policy does not change jobs already
queued.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any, Self, cast

from django.tasks import Task, TaskResult

from conveyor.conf import MAX_TTL
from conveyor.exceptions import InvalidTaskOption
from conveyor.records import PENDING_STATES, State, Success

TASK_FIELDS = frozenset(f.name for f in fields(Task))
HOOKS = ("on_success", "on_failure", "on_complete")
Hook = Callable[[TaskResult], object] | str  # a callable, or the dotted path to one

# Options and the values they take: (kind, smallest, largest).
_NUMBERS: dict[str, tuple[type, float, float]] = {
    "retries": (int, 0, 1000),
    "retry_backoff": (float, 0.0, 7 * 86400.0),
    "retry_backoff_max": (float, 0.0, 30 * 86400.0),
    "max_attempts": (int, 1, 1000),
    "timeout": (float, 0.001, 7 * 86400.0),
    "soft_timeout": (float, 0.001, 7 * 86400.0),
    "keep_last": (int, 0, 100_000),
    "unique_for": (float, 0.001, 366 * 86400.0),
}
# A task's ``result_ttl`` or ``failed_ttl``: keep its jobs whatever the backend's default.
FOREVER = math.inf
TTLS = ("result_ttl", "failed_ttl")
# The states in which a unique job keeps others with its key out, by ``unique_states``.
UNIQUE_STATES: dict[str, tuple[State, ...]] = {
    "queued": PENDING_STATES,
    "active": (*PENDING_STATES, State.RUNNING),
    "successful": (*PENDING_STATES, State.RUNNING, State.SUCCEEDED),
}
DEFAULT_UNIQUE_STATES = "active"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConveyorTask(Task):
    """A ``django.tasks`` task with Conveyor's options.

    ``retries``: how many times a failed run is tried again (0: never).
    ``retry_backoff``: seconds before the first retry; each later one waits twice as long.
    ``retry_backoff_max``: the longest wait between two tries, in seconds.
    ``retry_jitter``: spread each wait at random over its upper half, so that jobs that
    failed together do not all come back at once.
    ``retry_on``: only these exception types are retried (default: any ``Exception``).
    ``dont_retry_on``: these exception types are never retried.
    ``timeout``: seconds a run may take; past it the worker process running it is stopped
    and the run fails with ``TimeLimitExceeded`` (retried if the retry policy allows).
    ``soft_timeout``: seconds after which ``SoftTimeLimitExceeded`` is raised inside the
    task, which may catch it to clean up; shorter than ``timeout`` when both are set.
    ``max_attempts``: deliveries lost to a worker process that died running the job (a
    crash, an out-of-memory kill) after which the job is failed; the backend's
    ``MAX_ATTEMPTS`` by default.
    ``sigkill_on_stop``: at a graceful stop, stop a run of this task at once (its job goes
    back in line, uncounted) instead of waiting for it.
    ``result_ttl``: seconds a succeeded job is kept after it finished (``FOREVER``: always);
    the backend's ``RESULT_TTL`` by default (none: kept until pruned).
    ``failed_ttl``: the same for failed and cancelled jobs; the backend's ``FAILED_TTL`` by
    default (none: failures are kept until pruned).
    ``keep_last``: keep only the newest N successes of this task; older ones are deleted.
    ``on_success``, ``on_failure``, ``on_complete``: callables (or dotted paths to them)
    called with the final ``TaskResult`` once it is stored; part of the task's code, so
    ``.using()`` cannot change them.
    ``unique``: a call made while an equal one is stored (same task, same arguments) adds
    no job and returns that one's result instead; ``unique=False`` turns off a key.
    ``unique_key``: what makes two calls the same instead of all their arguments: a function
    called with the call's arguments, or (per call, through ``.using()``) a JSON value;
    setting it makes the task unique.
    ``unique_states``: while the stored job is ``"queued"`` (not started yet), ``"active"``
    (queued or running; the default) or ``"successful"`` (also once it succeeded).
    ``unique_for``: seconds from its enqueue after which a stored job no longer counts.
    """

    retries: int | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    retry_on: tuple[type[BaseException], ...] = ()
    dont_retry_on: tuple[type[BaseException], ...] = ()
    timeout: float | None = None
    soft_timeout: float | None = None
    max_attempts: int | None = None
    sigkill_on_stop: bool = False
    result_ttl: float | None = None
    failed_ttl: float | None = None
    keep_last: int | None = None
    on_success: Hook | None = None
    on_failure: Hook | None = None
    on_complete: Hook | None = None
    unique: bool | None = None
    unique_key: Callable[..., Any] | Any = None
    unique_states: str | None = None
    unique_for: float | None = None

    def __new__(cls, **kwargs: Any) -> Self:
        # Django's @task passes every keyword it does not know on to here: a misspelt
        # option is named with its task, not left to a bare TypeError.
        unknown = sorted(set(kwargs) - _FIELD_NAMES)
        if unknown:
            func = kwargs.get("func")
            path = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
            raise InvalidTaskOption(_unknown(path, unknown))
        return object.__new__(cls)

    def __post_init__(self) -> None:
        for name in ("retry_on", "dont_retry_on"):
            value = getattr(self, name)
            if isinstance(value, Iterable) and not isinstance(value, str | bytes):
                object.__setattr__(self, name, tuple(value))
        problems = option_problems(self)
        if problems:
            raise InvalidTaskOption(f"Task {self.module_path}: {' '.join(problems)}")
        Task.__post_init__(self)  # zero-argument super() fails in a slotted dataclass

    def using(
        self,
        *,
        priority: int | None = None,
        queue_name: str | None = None,
        run_after: datetime | None = None,
        backend: str | None = None,
        **options: Any,
    ) -> Self:
        """A copy with other defaults; Conveyor's options may be changed here too."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise InvalidTaskOption(_unknown(self.module_path, unknown))
        fixed = sorted(set(options) & set(HOOKS))
        if fixed:
            raise InvalidTaskOption(
                f"Task {self.module_path}: {', '.join(fixed)} cannot be changed per call; "
                "hooks belong to the task's definition."
            )
        changed: Task = Task.using(
            self, priority=priority, queue_name=queue_name, run_after=run_after, backend=backend
        )
        return cast(Self, replace(changed, **options) if options else changed)

    @property
    def unique_enabled(self) -> bool:
        """Say whether calls of this task are unique (``unique``, or a ``unique_key``)."""
        return bool(self.unique) or (self.unique is None and self.unique_key is not None)


_FIELD_NAMES = frozenset(f.name for f in fields(ConveyorTask))
OPTION_NAMES = tuple(f.name for f in fields(ConveyorTask) if f.name not in TASK_FIELDS)


def option_problems(task: ConveyorTask) -> list[str]:
    """What is wrong with ``task``'s options, each naming the option; [] if nothing."""
    problems = []
    for name, (kind, low, high) in _NUMBERS.items():
        value = getattr(task, name)
        if value is not None and not _number(value, kind, low, high):
            whole = "a whole number" if kind is int else "a number"
            problems.append(f"{name} must be {whole} from {low:g} to {high:g}, not {value!r}.")
    if not problems and task.timeout and task.soft_timeout and task.soft_timeout >= task.timeout:
        problems.append(
            f"soft_timeout ({task.soft_timeout:g}s) must be shorter than timeout "
            f"({task.timeout:g}s): it warns the task before the hard limit stops it."
        )
    problems += _ttl_problems(task)
    for name in HOOKS:
        hook = getattr(task, name)
        if hook is not None and not callable(hook) and not _dotted(hook):
            problems.append(f"{name} must be a callable or a dotted path to one, not {hook!r}.")
    if not isinstance(task.sigkill_on_stop, bool):
        problems.append(f"sigkill_on_stop must be True or False, not {task.sigkill_on_stop!r}.")
    if task.retry_jitter is not None and not isinstance(task.retry_jitter, bool):
        problems.append(f"retry_jitter must be True or False, not {task.retry_jitter!r}.")
    for name in ("retry_on", "dont_retry_on"):
        value = getattr(task, name)
        bad = [v for v in value if not _exception_type(v)] if isinstance(value, tuple) else [value]
        if bad:
            problems.append(
                f"{name} must list exception classes (such as ConnectionError), not "
                f"{', '.join(map(repr, bad))}."
            )
    return problems + unique_problems(task)


def unique_problems(task: ConveyorTask) -> list[str]:
    """What is wrong with ``task``'s unique options (the key function is tried at enqueue)."""
    problems = []
    if task.unique is not None and not isinstance(task.unique, bool):
        problems.append(f"unique must be True or False, not {task.unique!r}.")
    key = task.unique_key
    if key is not None and not callable(key) and (error := _key_error(key)) is not None:
        problems.append(
            "unique_key must be a function of the task's arguments or a JSON value, not "
            f"{key!r} ({error})."
        )
    states = task.unique_states
    if states is not None and states not in UNIQUE_STATES:
        problems.append(
            f"unique_states must be one of {', '.join(map(repr, UNIQUE_STATES))}, not {states!r}."
        )
    extras = [name for name in ("unique_states", "unique_for") if getattr(task, name) is not None]
    if extras and task.unique is None and key is None:
        problems.append(
            f"{' and '.join(extras)} only apply to unique jobs: set unique=True or unique_key."
        )
    return problems


def _ttl_problems(task: ConveyorTask) -> list[str]:
    return [
        f"{name} must be a number of seconds from 0 to {MAX_TTL}, or FOREVER, not {ttl!r}."
        for name in TTLS
        if (ttl := getattr(task, name)) is not None
        and ttl != FOREVER
        and not _number(ttl, float, 0, MAX_TTL)
    ]


def _key_error(value: Any) -> str | None:
    """Why ``value`` has no canonical JSON text (the form a unique key is compared in)."""
    try:
        _canonical(value)
    except (TypeError, ValueError, RecursionError) as e:
        return str(e) or type(e).__name__
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))


def _dotted(value: Any) -> bool:
    return (
        isinstance(value, str)
        and all(part.isidentifier() for part in value.split("."))
        and ("." in value)
    )


def _number(value: Any, kind: type, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if kind is int and not isinstance(value, int):
        return False
    return low <= value <= high and math.isfinite(value)


def _exception_type(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def _unknown(path: str, names: Iterable[str]) -> str:
    return (
        f"Task {path}: unknown option(s) {', '.join(map(repr, names))}; Conveyor's options "
        f"are {', '.join(OPTION_NAMES)}."
    )


def class_path(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


# --- the retry policy, as stored with a job ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a failed run of one job is retried; stored with the job at enqueue."""

    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 600.0
    jitter: bool = True
    retry_on: tuple[str, ...] = ()  # exception class paths; empty: any Exception
    dont_retry_on: tuple[str, ...] = ()

    @classmethod
    def for_task(cls, task: Task, defaults: RetryPolicy) -> RetryPolicy:
        """The policy a call of ``task`` is enqueued with: its options over ``defaults``."""
        if not isinstance(task, ConveyorTask):
            return defaults
        return cls(
            retries=_pick(task.retries, defaults.retries),
            backoff=_pick(task.retry_backoff, defaults.backoff),
            backoff_max=_pick(task.retry_backoff_max, defaults.backoff_max),
            jitter=_pick(task.retry_jitter, defaults.jitter),
            retry_on=tuple(map(class_path, task.retry_on)) or defaults.retry_on,
            dont_retry_on=tuple(map(class_path, task.dont_retry_on)) or defaults.dont_retry_on,
        )

    def stored(self) -> dict[str, Any]:
        """As kept with the job: nothing when the job is never retried."""
        if not self.retries:
            return {}
        return {
            "retries": self.retries,
            "backoff": self.backoff,
            "backoff_max": self.backoff_max,
            "jitter": self.jitter,
            "retry_on": list(self.retry_on),
            "dont_retry_on": list(self.dont_retry_on),
        }

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> RetryPolicy:
        if not stored.get("retries"):
            return cls()
        return cls(
            retries=int(stored["retries"]),
            backoff=float(stored["backoff"]),
            backoff_max=float(stored["backoff_max"]),
            jitter=bool(stored["jitter"]),
            retry_on=tuple(stored.get("retry_on", ())),
            dont_retry_on=tuple(stored.get("dont_retry_on", ())),
        )

    def retries_error(self, error: BaseException) -> bool:
        """Say whether a run that raised ``error`` may be retried (retries left aside)."""
        if not isinstance(error, Exception):
            return False
        paths = {class_path(kind) for kind in type(error).__mro__}
        if paths & set(self.dont_retry_on):
            return False
        return not self.retry_on or bool(paths & set(self.retry_on))

    def delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1 for the first)."""
        wait = min(self.backoff_max, self.backoff * 2.0 ** min(retry - 1, 64))
        return random.uniform(wait / 2, wait) if self.jitter else wait


def _pick[T](value: T | None, default: T) -> T:
    return default if value is None else value


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeLimits:
    """How long one run of a job may take, in seconds (None: no limit)."""

    hard: float | None = None
    soft: float | None = None

    @classmethod
    def for_task(cls, task: Task, defaults: TimeLimits) -> TimeLimits:
        if not isinstance(task, ConveyorTask):
            return defaults
        hard = _pick(task.timeout, defaults.hard)
        soft = _pick(task.soft_timeout, defaults.soft)
        if hard is not None and soft is not None and soft >= hard:
            soft = None  # a default soft limit longer than this task's hard one: no warning
        return cls(hard=hard, soft=soft)

    def stored(self) -> dict[str, Any]:
        limits = {"timeout": self.hard, "soft_timeout": self.soft}
        return {name: value for name, value in limits.items() if value is not None}

    @classmethod
    def from_stored(cls, options: Mapping[str, Any]) -> TimeLimits:
        return cls(hard=options.get("timeout"), soft=options.get("soft_timeout"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How long a finished job is kept, in seconds after it finished (None: until pruned).

    ``succeeded`` applies to successes, ``failed`` to failed and cancelled jobs;
    ``keep_last`` keeps only the newest that many successes of the job's task.
    """

    succeeded: float | None = None
    failed: float | None = None
    keep_last: int | None = None

    @classmethod
    def for_task(cls, task: Task, defaults: Retention) -> Retention:
        if not isinstance(task, ConveyorTask):
            return defaults
        return cls(
            succeeded=_ttl(task.result_ttl, defaults.succeeded),
            failed=_ttl(task.failed_ttl, defaults.failed),
            keep_last=task.keep_last,
        )

    def stored(self) -> dict[str, Any]:
        kept = {
            "result_ttl": self.succeeded,
            "failed_ttl": self.failed,
            "keep_last": self.keep_last,
        }
        return {name: value for name, value in kept.items() if value is not None}

    @classmethod
    def from_stored(cls, options: Mapping[str, Any]) -> Retention:
        return cls(
            succeeded=options.get("result_ttl"),
            failed=options.get("failed_ttl"),
            keep_last=options.get("keep_last"),
        )

    def expires(self, finished_at: datetime, *, succeeded: bool) -> datetime | None:
        """When a job that ended at ``finished_at`` may be deleted; None: it is kept."""
        ttl = self.succeeded if succeeded else self.failed
        return None if ttl is None else finished_at + timedelta(seconds=ttl)


TRIM_WINDOW = 100  # older successes of a keep_last task looked at past its newest N


def trims(successes: Iterable[Success], saved: Collection[str]) -> dict[tuple[str, int], int]:
    """The ``keep_last`` trims these saved successes call for.

    For each (task path, N): how many successes from the N-th newest on to let go of; the
    saved ones pushed that many out, and a window beyond them catches older stragglers.
    """
    pushed: Counter[tuple[str, int]] = Counter()
    for job, _ in successes:
        keep = job.options.get("keep_last")
        if keep is not None and job.id in saved:
            pushed[job.task_path, int(keep)] += 1
    return {key: TRIM_WINDOW + count for key, count in pushed.items()}


def _ttl(value: float | None, default: float | None) -> float | None:
    """A task's time to live over the backend's; ``FOREVER`` becomes None (kept)."""
    if value is None:
        return default
    return None if value == FOREVER else float(value)


# --- unique jobs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Uniqueness:
    """Which stored job a call of a unique task is the same as, and while when.

    ``key`` is the SHA-256 (hex) of the backend alias, the task's path and the call's key
    as canonical JSON: equal calls of one task on one backend share it, whatever their
    queue or priority. A job holds its key while it is in ``UNIQUE_STATES[states]``, and,
    with ``period``, until that many seconds after it was enqueued.
    """

    key: str
    states: str = DEFAULT_UNIQUE_STATES
    period: float | None = None

    @classmethod
    def for_call(
        cls, task: Task, alias: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Uniqueness | None:
        """How a call of ``task`` is unique; None if it is not. Raise if its key fails."""
        if not isinstance(task, ConveyorTask) or not task.unique_enabled:
            return None
        value = call_key(task, args, kwargs)
        text = _canonical([alias, task.module_path, value])
        return cls(
            key=hashlib.sha256(text.encode()).hexdigest(),
            states=task.unique_states or DEFAULT_UNIQUE_STATES,
            period=None if task.unique_for is None else float(task.unique_for),
        )

    def stored(self) -> dict[str, Any]:
        """As kept with the job, in its options."""
        stored: dict[str, Any] = {"key": self.key, "states": self.states}
        return stored if self.period is None else {**stored, "for": self.period}


def call_key(task: ConveyorTask, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The value that makes two calls of ``task`` the same; refused by name if it fails."""
    key = task.unique_key
    if key is None:
        return [list(args), dict(kwargs)]
    if not callable(key):
        return key
    where = f"Cannot enqueue task {task.module_path!r}: its unique_key function"
    try:
        value = key(*args, **kwargs)
    except Exception as e:
        raise InvalidTaskOption(
            f"{where} raised {type(e).__name__}: {e}. Nothing was stored."
        ) from e
    if (error := _key_error(value)) is not None:
        raise InvalidTaskOption(
            f"{where} returned {value!r} ({type(value).__name__}), which is not a JSON value "
            f"({error}). Nothing was stored."
        )
    return value
