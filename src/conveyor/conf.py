"""Backend options: parsed once per backend, read from ``TASKS[alias]["OPTIONS"]``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Self

from conveyor.exceptions import ConveyorImproperlyConfigured


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendOptions:
    """Options every durable Conveyor backend understands.

    ``lease``: seconds a claimed job stays reserved without a heartbeat.
    ``max_attempts``: deliveries after which a job whose worker keeps dying is failed.
    ``poll_interval``: longest idle wait between looks for work, in seconds.
    ``batch_size``: most jobs one worker process claims in one round trip.
    """

    lease: float = 30.0
    max_attempts: int = 5
    poll_interval: float = 0.5
    batch_size: int = 16

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
        """Raise if a value is out of range."""
        where = f"TASKS[{alias!r}]['OPTIONS']"
        for name in ("lease", "poll_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConveyorImproperlyConfigured(
                    f"{where}[{name.upper()!r}] must be a positive number of seconds, "
                    f"not {value!r}."
                )
        for name in ("max_attempts", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConveyorImproperlyConfigured(
                    f"{where}[{name.upper()!r}] must be a whole number of at least 1, "
                    f"not {value!r}."
                )
