"""What ``manage.py conveyor`` accepts: argument types, bounds, and a worker's settings.

A worker's settings come from the command line, then a host's ``--config FILE``, then the
backend's ``OPTIONS``, then the defaults.
"""

from __future__ import annotations

import os
from argparse import ArgumentTypeError
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conveyor import fleet
from conveyor.exceptions import ConveyorImproperlyConfigured
from conveyor.records import QueueSelector

if TYPE_CHECKING:
    from conveyor.backends.base import StoreBackend
    from conveyor.runtime.supervisor import WorkerSettings

MAX_PROCESSES = 512
MAX_THREADS = 256
MAX_TASKS = 10**9
MAX_GRACE = 86400.0  # a day
MAX_DAYS = 36500.0  # a century: within datetime's range, and older than any job
MAX_BATCH = 10000  # ids in one DELETE stay under every engine's limit on parameters
DEFAULT_GRACE = 30.0
MIN_INTERVAL, MAX_INTERVAL, DEFAULT_INTERVAL = 0.1, 3600.0, 2.0  # monitor --interval
SCHEDULE_VERBS = ("list", "run", "pause", "resume", "sync")
QUEUE_VERBS = ("list", "pause", "resume", "clear", "dedupe")
# Worker options that only mean something for a supervised pool of processes.
POOL_OPTIONS = {
    "processes": "--processes",
    "machine": "--machine",
    "machines": "--of",
    "config": "--config",
    "max_memory": "--max-memory",
    "threads": "--threads",
    "grace": "--grace",
    "progress": "--progress",
    "metrics_port": "--metrics-port",
}


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ArgumentTypeError(f"must be a whole number from {low} to {high}, not {text!r}.")
        return value

    return parse


def number(low: float, high: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` (or, ``above``, more than it) to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        # NaN fails every comparison, and an infinity the upper bound.
        if not ((low < value if above else low <= value) and value <= high):
            least = f"more than {low:g}" if above else f"from {low:g}"
            raise ArgumentTypeError(f"must be a number {least} up to {high:g}, not {text!r}.")
        return value

    return parse


def listen_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT``: where to listen (every address if no host)."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if colon else ""
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ArgumentTypeError(f"expected PORT or HOST:PORT, a port from 0 to 65535; not {text!r}")
    return (host or "0.0.0.0", number)


def process_counts(text: str) -> int | dict[str, int]:
    """``--processes``: a number, or ``queue=N,...``."""
    if "=" not in text:
        return whole(1, MAX_PROCESSES)(text)
    try:
        return fleet.parse_counts(text)
    except ConveyorImproperlyConfigured:
        raise ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_PROCESSES}, or QUEUE=N pairs (N from 0 to "
            f"{MAX_PROCESSES}, 1 in all at least) split by commas, not {text!r}."
        ) from None


def _as_text(value: Any) -> str:
    """A config file's value as the command line would give it."""
    if isinstance(value, dict):
        return ",".join(f"{queue}={count}" for queue, count in value.items())
    return str(value)


def worker_settings(
    backend: StoreBackend,
    queues_of: Callable[[StoreBackend, dict[str, Any]], QueueSelector],
    options: dict[str, Any],
) -> WorkerSettings:
    """The supervisor's settings for ``options``; raise ``ConveyorImproperlyConfigured``."""
    from conveyor.runtime.supervisor import WorkerSettings

    options = with_host_config(options)
    counts = (
        options["processes"]
        or backend.conveyor_options.processes
        or min(os.cpu_count() or 1, MAX_PROCESSES)
    )
    queues = queues_of(backend, options)
    pools = fleet.pools_for(
        counts, queues, backend.queues, options["machine"] or 1, options["machines"] or 1
    )
    memory = options["max_memory"]
    return WorkerSettings(
        backend=backend.alias,
        queues=queues,
        processes=sum(pool.processes for pool in pools),
        pools=pools,
        threads=options["threads"] or 1,
        max_tasks_per_child=options["max_tasks_per_child"],
        max_memory=int(memory * 2**20) if memory else None,
        until_done=options["until_done"],
        grace=options["grace"] or DEFAULT_GRACE,
        progress=options["progress"],
        scheduler=not options["no_scheduler"],
        metrics=options.get("metrics_port"),
    )


def with_host_config(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with what ``--config FILE`` sets wherever the command line is silent."""
    if not options.get("config"):
        return options
    host = fleet.load_host_config(options["config"])
    parsers: dict[str, tuple[str, Callable[[str], Any]]] = {
        "PROCESSES": ("processes", process_counts),
        "THREADS": ("threads", whole(1, MAX_THREADS)),
        "MAX_TASKS_PER_CHILD": ("max_tasks_per_child", whole(1, MAX_TASKS)),
        "MAX_MEMORY": ("max_memory", number(1, 2**30)),
        "GRACE": ("grace", number(0, MAX_GRACE, above=True)),
        "MACHINE": ("machine", whole(1, MAX_PROCESSES)),
        "MACHINES": ("machines", whole(1, MAX_PROCESSES)),
    }
    merged = dict(options)
    for key, value in host.items():
        if key == "SCHEDULER":
            if not isinstance(value, bool):
                raise ConveyorImproperlyConfigured(
                    f"--config: SCHEDULER must be True or False, not {value!r}."
                )
            merged["no_scheduler"] = options["no_scheduler"] or not value
            continue
        name, parse = parsers[key]
        if merged.get(name) not in (None, False):
            continue  # the command line wins
        text = value if isinstance(value, str) else _as_text(value)
        try:
            merged[name] = parse(text)
        except ArgumentTypeError as e:
            raise ConveyorImproperlyConfigured(f"--config: {key} {e}") from e
    return merged
