"""OpenTelemetry spans around enqueue and around each run of a job (an optional extra).

With ``opentelemetry-api`` installed (``pip install "django-conveyor[tracing]"``) and a tracer
provider configured by the project, ``enqueue()`` and ``bulk_enqueue()`` make a PRODUCER span
(``enqueue <task>``), and each run of a job a CONSUMER span (``run <task>``) whose parent is
the span that enqueued it: the trace context travels with the job (stored in its options, as
W3C ``traceparent``), so a request and the jobs it enqueued read as one trace, across
processes and machines. The task runs inside its span, so spans it makes nest under it.
``CONVEYOR_TRACING = False`` turns it off. Without a configured provider the spans are
OpenTelemetry's no-op ones.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.util import find_spec
from typing import Any

from django.conf import settings

SYSTEM = "conveyor"
# The trace context of the enqueue in progress in this thread, stored with each job it adds.
_carrier: ContextVar[dict[str, str] | None] = ContextVar("conveyor_trace_carrier", default=None)


@functools.cache
def available() -> bool:
    """Whether ``opentelemetry-api`` is installed."""
    return find_spec("opentelemetry") is not None and find_spec("opentelemetry.trace") is not None


def enabled() -> bool:
    """Whether spans are made: the API is installed and ``CONVEYOR_TRACING`` is not False."""
    return available() and bool(getattr(settings, "CONVEYOR_TRACING", True))


def carrier() -> dict[str, str] | None:
    """The trace context to store with a job enqueued now, if any."""
    return _carrier.get()


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer("conveyor")


@contextmanager
def enqueueing(task: Any, backend: str, count: int) -> Iterator[Any]:
    """A PRODUCER span around storing ``count`` calls of ``task``; None if tracing is off."""
    if not enabled():
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.destination.name": task.queue_name,
        "conveyor.task": task.module_path,
        "conveyor.backend": backend,
    }
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    name = f"enqueue {task.module_path}"
    with _tracer().start_as_current_span(
        name, kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        context: dict[str, str] = {}
        propagate.inject(context)
        token = _carrier.set(context or None)
        try:
            yield span
        finally:
            _carrier.reset(token)


def enqueued(span: Any, results: list[Any]) -> None:
    """Name the job a single enqueue added on its span."""
    if span is not None and len(results) == 1:
        span.set_attribute("messaging.message.id", str(results[0].id))


@contextmanager
def running(job: Any) -> Iterator[Any]:
    """A CONSUMER span around one run of ``job``, its parent the span that enqueued it."""
    if not enabled():
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    stored = job.options.get("trace") if isinstance(job.options, Mapping) else None
    parent = propagate.extract(stored) if isinstance(stored, Mapping) else None
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue_name,
        "messaging.message.id": job.id,
        "conveyor.task": job.task_path,
        "conveyor.backend": job.backend,
        "conveyor.attempt": job.attempt,
    }
    with _tracer().start_as_current_span(
        f"run {job.task_path}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def ran(span: Any, outcome: Any) -> None:
    """Say on a run's span how the run ended: its error, and what becomes of the job."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("conveyor.outcome", outcome.disposition.value)
    if outcome.error is None:
        return
    if outcome.exception is not None:
        span.record_exception(outcome.exception)
    span.set_status(Status(StatusCode.ERROR, outcome.error.exception_class_path))
