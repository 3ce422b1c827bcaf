"""Stored task paths to registered tasks, and arguments to the JSON a store keeps.

One rule on every backend: what enqueue accepts, every engine stores faithfully, and what
one engine would refuse is refused at enqueue, naming the task and the argument, before
anything is stored.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.tasks import Task
from django.utils.module_loading import import_string

from conveyor.exceptions import InvalidTaskArguments, TaskNotFound

if TYPE_CHECKING:
    from conveyor.conf import BackendOptions

# MariaDB refuses JSON nested deeper than 32 levels; each argument is stored one level
# inside the args list or kwargs object, so an argument may nest this deep.
MAX_DEPTH = 30
# Whole numbers every engine keeps exactly (MySQL turns bigger ones into doubles).
MIN_INT, MAX_INT = -(2**63), 2**63 - 1
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
    left ``QUEUES`` still runs, and still reads back, on the queue it was sent to. Tasks
    are immutable, so each copy is kept and handed out again while the module still
    holds the same task.
    """
    registered = resolve_task(path)
    # Only tasks without a run_after are kept: a time would come back as the first job
    # that had it wrote it, zone and all.
    key = (path, alias, queue_name, priority) if run_after is None else None
    found = _stored.get(key) if key is not None else None
    if found is not None and found[0] is registered:
        return found[1]
    task = copy.copy(registered)
    for name, value in (
        ("backend", alias),
        ("queue_name", queue_name),
        ("priority", priority),
        ("run_after", run_after),
    ):
        object.__setattr__(task, name, value)
    if key is not None:
        if len(_stored) >= STORED_TASKS:
            _stored.clear()
        _stored[key] = (registered, task)
    return task


STORED_TASKS = 1024  # copies kept (of jobs without a run_after); most share a handful
_stored: dict[tuple[Any, ...], tuple[Task, Task]] = {}


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


def call_problem(task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """Why the task's function cannot take these arguments, or None if it can."""
    try:
        signature = inspect.signature(task.func)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return None
    params = list(signature.parameters.values())
    if task.takes_context and params:
        params = params[1:]
    try:
        signature.replace(parameters=params).bind(*args, **kwargs)
    except TypeError as e:
        return str(e)
    return None


def due_later(task: Task, now: datetime) -> datetime | None:
    """When a call of ``task`` enqueued ``now`` falls due, if that is later (it is scheduled)."""
    run_after = task.run_after
    return run_after if run_after is not None and run_after > now else None


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
    text = text_problem(task.queue_name)
    if text is not None:
        problems.append(f"Queue name {task.queue_name!r} of task {task.module_path!r} {text}.")
    if task.run_after is not None and not _storable_time(task.run_after):
        problems.append(
            f"run_after {task.run_after.isoformat()} of task {task.module_path!r} is outside "
            f"the range every database stores ({EARLIEST.date()} to {LATEST.date()}, UTC)."
        )
    return problems


def text_problem(text: str) -> str | None:
    """Why the string ``text`` cannot be stored on every engine, or None if it can."""
    if "\x00" in text:
        return "contains a NUL character (\\x00), which PostgreSQL cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (half of a UTF-16 pair), which is not valid Unicode"
    return None


def _storable_time(moment: datetime) -> bool:
    earliest, latest = EARLIEST, LATEST
    if moment.utcoffset() is None:  # naive (USE_TZ = False): local time, kept as it is
        earliest, latest = EARLIEST.replace(tzinfo=None), LATEST.replace(tzinfo=None)
    try:
        return earliest <= moment <= latest
    except OverflowError:
        return False


def encode_arguments(
    task: Task, args: Sequence[Any], kwargs: Mapping[str, Any], options: BackendOptions
) -> tuple[list[Any], dict[str, Any]]:
    """Return ``args``/``kwargs`` as they read back from JSON, or name the one that can't.

    Raises ``InvalidTaskArguments`` (also a ``TypeError``) before anything is stored.
    """
    plain = _plain_arguments(args, kwargs, options.max_payload)
    if plain is not None:
        return plain
    named = [(f"positional argument {i}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for where, value in named:
        problem = json_problem(value, options.max_payload)
        if problem is not None:
            raise InvalidTaskArguments(
                f"Cannot enqueue task {task.module_path!r}: {where} ({type(value).__name__}) "
                f"cannot be stored: {problem}. Arguments must be JSON values; nothing was "
                "stored."
            )
    text = encode_json([list(args), dict(kwargs)])
    size = len(text.encode("utf-8"))
    if size > options.max_payload:
        where, largest = max(((w, _size(v)) for w, v in named), key=lambda pair: pair[1])
        raise InvalidTaskArguments(
            f"Cannot enqueue task {task.module_path!r}: its arguments take {size} bytes as "
            f"JSON, more than MAX_PAYLOAD ({options.max_payload}); the largest is {where} "
            f"({largest} bytes). Nothing was stored."
        )
    decoded: list[Any] = json.loads(text)
    return decoded[0], decoded[1]


def _plain_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any], max_bytes: int
) -> tuple[list[Any], dict[str, Any]] | None:
    """The arguments as they read back from JSON, if a look at their JSON text as a whole
    shows that ``json_problem`` could find nothing wrong with any of them; None: look at
    each one (most calls pass small plain values, and take this way)."""
    try:
        text = encode_json([list(args), dict(kwargs)])
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    if (
        size > max_bytes
        or text.count("[") + text.count("{") > MAX_DEPTH  # none can be nested too deep
        or text.count("{") > 1  # the only dict is the keyword arguments: no key can collide
        or _ESCAPED_NUL.search(text)
        or _LONG_NUMBER.search(text)
    ):
        return None
    decoded: list[Any] = json.loads(text)
    return decoded[0], decoded[1]


def encode_json(value: Any) -> str:
    """The JSON text a store keeps for ``value`` (no NaN, no infinities)."""
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def json_problem(value: Any, max_bytes: int | None = None) -> str | None:
    """Why ``value`` cannot be stored as JSON on every engine, or None if it can.

    The rules: JSON types only (no NaN or infinities); lists and dicts nested at most
    ``MAX_DEPTH`` deep (``value`` itself counts as one level if it is a list or dict);
    whole numbers within 64 bits; strings and dict keys without NUL characters or lone
    surrogates; dict keys that stay distinct once made strings; and, with ``max_bytes``, at
    most that many bytes as JSON text. Nesting of any depth is refused with a reason,
    never with ``RecursionError``.
    """
    try:
        text = encode_json(value)
    except RecursionError:
        return f"it is nested deeper than {MAX_DEPTH} levels of lists and dicts"
    except (TypeError, ValueError) as e:
        return f"it is not JSON-serialisable: {e}"
    if _ESCAPED_NUL.search(text):
        return "it contains a NUL character (\\x00), which PostgreSQL cannot store"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return (
            "it contains a lone surrogate (half of a UTF-16 pair), which is not valid Unicode text"
        )
    if max_bytes is not None and size > max_bytes:
        return f"it is {size} bytes as JSON, more than MAX_PAYLOAD ({max_bytes})"
    problem = _shape_problem(value, text)
    if problem is None and "{" in text:
        try:
            json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            problem = (
                f"its dict keys collide once made JSON: {e.key!r} appears twice (JSON keys "
                'are strings, so 1 and "1", or True and "true", are the same key)'
            )
    return problem


# A ``\u0000`` escape in JSON text: preceded by an even number of backslashes, so that it
# is not the text "\\u0000" (an escaped backslash followed by "u0000").
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A run of 19 digits may be a whole number beyond 64 bits (2**63 has 19 digits).
_LONG_NUMBER = re.compile(r"\d{19}")


def _shape_problem(value: Any, text: str) -> str | None:
    """Nesting too deep or a whole number too big, looked for only where the text hints."""
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    if not deep and not _LONG_NUMBER.search(text):
        return None
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list | tuple):
            if level + 1 > MAX_DEPTH:
                return f"it is nested deeper than {MAX_DEPTH} levels of lists and dicts"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
        elif isinstance(item, int) and not MIN_INT <= item <= MAX_INT:
            return (
                f"it holds the whole number {_abbreviated(item)}, outside the 64-bit range "
                "every database stores exactly (-2**63 to 2**63-1); send big numbers as "
                "strings"
            )
    return None


def _abbreviated(number: int) -> str:
    digits = str(number)
    return digits if len(digits) <= 30 else f"{digits[:12]}...{digits[-6:]}"


def _size(value: Any) -> int:
    return len(encode_json(value).encode("utf-8"))


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
