"""Stored task paths to registered tasks, and arguments to the JSON a store keeps.

One rule on every backend: what enqueue accepts, every engine stores faithfully, and what
one engine would refuse is refused at enqueue, naming the task and the argument, before
anything is stored.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.tasks import Task
from django.utils.module_loading import import_string

from conveyor.exceptions import InvalidTaskArguments, TaskNotFound

if TYPE_CHECKING:
    from conveyor.conf import BackendOptions

# MariaDB refuses JSON nested deeper than 32 levels; the stored arguments are one level
# inside the args list or kwargs object, so values may nest this deep.
MAX_DEPTH = 30
QUEUE_NAME_LENGTH = 100
TASK_PATH_LENGTH = 255
# The range of datetimes every engine stores (MySQL's DATETIME starts at year 1000).
EARLIEST = datetime(1000, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)


def resolve_task(path: str) -> Task:
    """Import ``path`` and return it only if it is a module-level ``Task``."""
    try:
        task = import_string(path)
    except ImportError as e:
        raise TaskNotFound(f"Task {path!r} cannot be imported: {e}") from e
    if not isinstance(task, Task):
        raise TaskNotFound(
            f"{path!r} is a {type(task).__name__}, not a task; only functions decorated "
            "with @task run."
        )
    return task


def stored_task(path: str, alias: str, queue_name: str, priority: int, run_after: Any) -> Task:
    """The task a stored job names, with the job's settings as they were at enqueue.

    Not validated against today's settings: a job already stored on a queue that has since
    left ``QUEUES`` still runs, and still reads back, on the queue it was sent to.
    """
    task = copy.copy(resolve_task(path))
    for name, value in (
        ("backend", alias),
        ("queue_name", queue_name),
        ("priority", priority),
        ("run_after", run_after),
    ):
        object.__setattr__(task, name, value)
    return task


def unavailable_task(path: str, alias: str, queue_name: str, priority: int) -> Task:
    """A stand-in ``Task`` for a stored job whose task cannot be loaded here any more.

    It keeps the stored path, so ``result.task.module_path`` still says what ran; calling
    it raises ``TaskNotFound``. Built without validation, as the real task is gone.
    """
    module, _, name = path.rpartition(".")

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise TaskNotFound(f"Task {path!r} is not available in this process.")

    unavailable.__module__, unavailable.__name__, unavailable.__qualname__ = module, name, name
    task = object.__new__(Task)
    values = {
        "func": unavailable,
        "priority": priority,
        "backend": alias,
        "queue_name": queue_name,
        "run_after": None,
        "takes_context": False,
    }
    for field_name, value in values.items():
        object.__setattr__(task, field_name, value)
    return task


def task_problems(task: Task) -> list[str]:
    """What no engine could store about ``task`` itself (its path, queue or run_after)."""
    problems = []
    if len(task.module_path) > TASK_PATH_LENGTH:
        problems.append(
            f"Task path {task.module_path[:60]!r}... is {len(task.module_path)} characters "
            f"long; at most {TASK_PATH_LENGTH} can be stored."
        )
    if len(task.queue_name) > QUEUE_NAME_LENGTH:
        problems.append(
            f"Queue name {task.queue_name[:40]!r}... of task {task.module_path!r} is "
            f"{len(task.queue_name)} characters long; at most {QUEUE_NAME_LENGTH} can be stored."
        )
    run_after = task.run_after
    if run_after is not None and run_after.tzinfo is not None:
        try:
            outside = not EARLIEST <= run_after <= LATEST
        except OverflowError:
            outside = True
        if outside:
            problems.append(
                f"run_after {run_after.isoformat()} of task {task.module_path!r} is outside "
                f"the range every database stores ({EARLIEST.date()} to {LATEST.date()})."
            )
    return problems


def encode_arguments(
    task: Task, args: Sequence[Any], kwargs: Mapping[str, Any], options: BackendOptions
) -> tuple[list[Any], dict[str, Any]]:
    """Return ``args``/``kwargs`` as they read back from JSON, or name the one that can't."""
    value = [list(args), dict(kwargs)]
    problem = json_problem(value, options.max_payload)
    if problem is not None:
        raise InvalidTaskArguments(_describe(task, args, kwargs, options.max_payload, problem))
    decoded: list[Any] = json.loads(encode_json(value))
    return decoded[0], decoded[1]


def encode_json(value: Any) -> str:
    """The JSON text a store keeps for ``value`` (no NaN, no infinities)."""
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def json_problem(value: Any, max_bytes: int | None = None) -> str | None:
    """Why ``value`` cannot be stored as JSON on every engine, or None if it can."""
    try:
        text = encode_json(value)
    except RecursionError:
        return f"it is nested deeper than {MAX_DEPTH} levels"
    except (TypeError, ValueError) as e:
        return f"it is not JSON-serialisable: {e}"
    if "\x00" in text:
        return "it contains a NUL character (\\x00), which PostgreSQL cannot store"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "it contains a lone surrogate character, which is not valid Unicode text"
    if max_bytes is not None and size > max_bytes:
        return f"it is {size} bytes as JSON, more than MAX_PAYLOAD ({max_bytes})"
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        return f"it is nested deeper than {MAX_DEPTH} levels"
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        return (
            f"its dict keys {e.key!r} collide once made JSON (keys become strings, so 1 "
            'and "1" are the same key)'
        )
    return None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict | list | tuple):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((child, level + 1) for child in children)
    return deepest


def _describe(
    task: Task, args: Sequence[Any], kwargs: Mapping[str, Any], max_payload: int, problem: str
) -> str:
    named = [(f"positional argument {i}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for where, value in named:
        # Each argument sits one level inside the stored list or object.
        own = json_problem([value])
        if own is not None:
            return (
                f"Cannot enqueue task {task.module_path!r}: {where} ({type(value).__name__}) "
                f"cannot be stored: {own}. Arguments must be JSON values; nothing was stored."
            )
    return (
        f"Cannot enqueue task {task.module_path!r}: its arguments cannot be stored: {problem}. "
        "Nothing was stored."
    )
