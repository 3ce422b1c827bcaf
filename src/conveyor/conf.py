"""Backend options: parsed once per backend, read from ``TASKS[alias]["OPTIONS"]``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from conveyor.exceptions import ConveyorImproperlyConfigured

MAX_TTL = 10 * 365 * 86400  # the longest time to live of a finished job: ten years


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendOptions:
    """Options every durable Conveyor backend understands.

    ``lease``: seconds a claimed job stays reserved without a heartbeat.
    ``max_attempts``: deliveries lost to a dying worker after which a job is failed.
    ``poll_interval``: longest idle wait between looks for work, in seconds.
    ``batch_size``: most jobs one worker process claims, or saves outcomes for, at once.
    ``max_payload``: most bytes the arguments of one call may take as JSON.
    ``retries``, ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``, ``timeout``,
    ``soft_timeout``: for tasks that set none of their own (``conveyor.options.ConveyorTask``).
    ``cancel_grace``: seconds a running job asked to stop has before its worker stops it.
    ``result_ttl``: seconds a succeeded job is kept after it finished (None: until pruned).
    ``failed_ttl``: seconds a failed or cancelled job is kept (None: until pruned); both for
    tasks that set none of their own.
    ``processes``: worker processes a ``conveyor worker`` runs: a number, or a dict of queue
    name to processes; the command line overrides it.
    """

    lease: float = 30.0
    max_attempts: int = 5
    poll_interval: float = 0.5
    batch_size: int = 16
    max_payload: int = 1024 * 1024
    retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    timeout: float | None = None
    soft_timeout: float | None = None
    cancel_grace: float = 10.0
    result_ttl: float | None = None
    failed_ttl: float | None = None
    # Worker processes: a number, or a dict of queue name to processes (``conveyor.fleet``).
    processes: int | dict[str, int] | None = None

    # name -> (smallest, largest) allowed; whole numbers for int fields.
    ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "lease": (0.1, 86400.0),
        "max_attempts": (1, 1000),
        "poll_interval": (0.001, 60.0),
        "batch_size": (1, 1000),
        "max_payload": (1024, 64 * 1024 * 1024),
        "retries": (0, 1000),
        "retry_backoff": (0.0, 7 * 86400.0),
        "retry_backoff_max": (0.0, 30 * 86400.0),
        "timeout": (0.001, 7 * 86400.0),
        "soft_timeout": (0.001, 7 * 86400.0),
        "cancel_grace": (0.0, 3600.0),
        "result_ttl": (0, MAX_TTL),
        "failed_ttl": (0, MAX_TTL),
    }
    # Options among ``ranges`` that take whole numbers only.
    whole_numbers: ClassVar[frozenset[str]] = frozenset(
        {"max_attempts", "batch_size", "max_payload", "retries"}
    )

    @classmethod
    def from_settings(cls, alias: str, raw: dict[str, Any]) -> Self:
        """Build options from a ``TASKS`` entry, rejecting unknown or invalid keys."""
        known = {f.name.upper(): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConveyorImproperlyConfigured(
                f"TASKS[{alias!r}]['OPTIONS'] has unknown option(s) {', '.join(unknown)}; "
                f"known options are {', '.join(sorted(known))}."
            )
        values = {known[key].name: value for key, value in raw.items()}
        options = cls(**values)
        options.validate(alias)
        return options

    def validate(self, alias: str) -> None:
        """Raise if a value is of the wrong kind or out of its range.

        Numbers must be finite and within ``ranges`` (booleans, strings, NaN and infinities
        are refused); options whose default is a string, such as ``DATABASE``, must be
        non-empty strings.
        """
        where = f"TASKS[{alias!r}]['OPTIONS']"
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(field.default, str) and not (isinstance(value, str) and value):
                raise ConveyorImproperlyConfigured(
                    f"{where}[{field.name.upper()!r}] must be a non-empty string, not {value!r}."
                )
            if isinstance(field.default, bool) and not isinstance(value, bool):
                raise ConveyorImproperlyConfigured(
                    f"{where}[{field.name.upper()!r}] must be True or False, not {value!r}."
                )
        for name, (low, high) in self.ranges.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            whole = name in self.whole_numbers
            if not _in_range(value, low, high, whole):
                kind = "a whole number" if whole else "a number"
                bounds = f"from {_shown(low)} to {_shown(high)}"
                raise ConveyorImproperlyConfigured(
                    f"{where}[{name.upper()!r}] must be {kind} {bounds}, not {value!r}."
                )
        if self.processes is not None:
            from conveyor.fleet import counts_of

            counts_of(self.processes, f"{where}['PROCESSES']")
        if self.timeout and self.soft_timeout and self.soft_timeout >= self.timeout:
            raise ConveyorImproperlyConfigured(
                f"{where}['SOFT_TIMEOUT'] ({self.soft_timeout:g}s) must be shorter than "
                f"{where}['TIMEOUT'] ({self.timeout:g}s): it warns tasks before they are stopped."
            )


_OPTIONAL = {"timeout", "soft_timeout", "result_ttl", "failed_ttl"}  # None: no limit
_WHOLE = {"max_attempts", "batch_size", "max_payload", "retries"}


def _in_range(value: Any, low: float, high: float, whole: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if whole and not isinstance(value, int):
        return False
    # Compared first: math.isfinite() overflows on a whole number beyond a float's range.
    return low <= value <= high and math.isfinite(value)


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"
