"""Fleets: how many worker processes each queue gets, on each machine.

``OPTIONS["PROCESSES"]`` (or ``--processes emails=2,reports=1``) gives a count per queue.
Spread over M machines (``--machine N --of M``), the processes are numbered queue by queue,
queues in name order, and machine N runs every M-th of them starting with the N-th, so
that together the machines run exactly the configured counts. ``--config FILE`` names a
Python file of worker options for one host, which the command line overrides.
"""

from __future__ import annotations

import runpy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.exceptions import ConveyorImproperlyConfigured
from conveyor.records import Pool, QueueSelector

MAX_PROCESSES = 512
# What a host's config file may set, and what each must be.
HOST_OPTIONS = {
    "PROCESSES": "a number of processes, or a dict of queue name to processes",
    "THREADS": "threads per process",
    "MAX_TASKS_PER_CHILD": "tasks after which a process is replaced",
    "MAX_MEMORY": "MiB of memory past which a process is replaced",
    "GRACE": "seconds running tasks get to finish on stop",
    "SCHEDULER": "True or False: fire due schedules",
    "MACHINE": "this machine's number, from 1",
    "MACHINES": "how many machines share the processes",
}


def counts_of(value: Any, where: str) -> int | dict[str, int]:
    """A process count, or counts per queue, checked; raise naming ``where``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= MAX_PROCESSES:
            return value
    elif isinstance(value, Mapping) and value:
        counts: dict[str, int] = {}
        for queue, count in value.items():
            if not isinstance(queue, str) or not queue:
                break
            if isinstance(count, bool) or not isinstance(count, int):
                break
            if not 0 <= count <= MAX_PROCESSES:
                break
            counts[queue] = count
        else:
            if sum(counts.values()) >= 1:
                return counts
    raise ConveyorImproperlyConfigured(
        f"{where} must be a number of processes from 1 to {MAX_PROCESSES}, or a dict of queue "
        f"names to such numbers (0 allowed, 1 in all at least), not {value!r}."
    )


def parse_counts(text: str) -> int | dict[str, int]:
    """``4`` or ``emails=2,reports=1`` as the command line gives them."""
    text = text.strip()
    if "=" not in text:
        try:
            return counts_of(int(text), "--processes")
        except ValueError:
            pass
    pairs: dict[str, Any] = {}
    for part in text.split(","):
        queue, _, count = part.partition("=")
        try:
            pairs[queue.strip()] = int(count)
        except ValueError:
            pairs[queue.strip()] = count
    return counts_of(pairs, "--processes")


def share(counts: Mapping[str, int], machine: int, machines: int) -> dict[str, int]:
    """The processes per queue machine ``machine`` of ``machines`` runs (queues with 0 left out).

    {"emails": 2, "reports": 1} over 2 machines: machine 1 runs {"emails": 1, "reports": 1},
    machine 2 {"emails": 1}.
    """
    if not 1 <= machine <= machines:
        raise ConveyorImproperlyConfigured(
            f"--machine must be from 1 to --of ({machines}), not {machine}."
        )
    numbered = [queue for queue in sorted(counts) for _ in range(counts[queue])]
    mine: dict[str, int] = {}
    for queue in numbered[machine - 1 :: machines]:
        mine[queue] = mine.get(queue, 0) + 1
    return mine


def load_host_config(path: str | Path) -> dict[str, Any]:
    """The worker options a host's config file sets (its UPPERCASE names), checked by name."""
    try:
        values = runpy.run_path(str(path))
    except FileNotFoundError as e:
        raise ConveyorImproperlyConfigured(f"--config {str(path)!r}: no such file.") from e
    except Exception as e:
        raise ConveyorImproperlyConfigured(
            f"--config {str(path)!r} cannot be read: {type(e).__name__}: {e}"
        ) from e
    options = {key: value for key, value in values.items() if key.isupper()}
    unknown = sorted(set(options) - set(HOST_OPTIONS))
    if unknown:
        known = "; ".join(f"{key} ({what})" for key, what in HOST_OPTIONS.items())
        raise ConveyorImproperlyConfigured(
            f"--config {str(path)!r} sets unknown option(s) {', '.join(unknown)}; it may set "
            f"{known}."
        )
    return options


def pools_for(
    counts: int | Mapping[str, int],
    queues: QueueSelector,
    known: frozenset[str] | set[str],
    machine: int = 1,
    machines: int = 1,
) -> tuple[Pool, ...]:
    """The pools of processes this machine runs: per queue, or all on ``queues``."""
    if isinstance(counts, int):
        mine = share({"": counts}, machine, machines).get("", 0)
        if mine == 0:
            raise ConveyorImproperlyConfigured(
                f"{counts} process(es) over {machines} machines leave none for machine {machine}."
            )
        return (Pool(queues, mine),)
    if queues.include is not None or queues.exclude:
        raise ConveyorImproperlyConfigured(
            "Processes per queue name their queues: --queue and --exclude-queue cannot be "
            "combined with them."
        )
    unknown = sorted(set(counts) - set(known)) if known else []
    if unknown:
        raise ConveyorImproperlyConfigured(
            f"Processes per queue name unknown queue(s) {', '.join(map(repr, unknown))}; the "
            f"backend's QUEUES are {', '.join(map(repr, sorted(known)))}."
        )
    mine_per_queue = share(counts, machine, machines)
    if not mine_per_queue:
        raise ConveyorImproperlyConfigured(
            f"The processes per queue ({sum(counts.values())} in all) over {machines} machines "
            f"leave none for machine {machine}."
        )
    return tuple(
        Pool(QueueSelector(include=frozenset({queue})), count)
        for queue, count in sorted(mine_per_queue.items())
    )
