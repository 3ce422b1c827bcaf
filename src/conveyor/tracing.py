"""OpenTelemetry spans around enqueue and around each run of a job (an optional extra).

With ``opentelemetry-api`` installed (``pip install "django-conveyor[tracing]"``) and a tracer
provider configured by the project, ``enqueue()`` and ``bulk_enqueue()`` make a PRODUCER span
(``enqueue <task>``), and each run of a job a CONSUMER span (``run <task>``) whose parent is
the span that enqueued it: the W3C trace context (``traceparent``, ``tracestate``; never
baggage) travels with the job in its options, so a request and the jobs it enqueued read as
one trace, across processes and machines. The task runs inside its span, so spans it makes
nest under it. ``CONVEYOR_TRACING = False`` turns it off; with no provider configured no span
is made at all.

Tracing never stands in a job's way: an error inside OpenTelemetry (a broken exporter or
propagator, an exception that cannot be printed) is logged once and the span is left out.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.util import find_spec
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

SYSTEM = "conveyor"
FLUSH_WAIT_MS = 2000  # longest a process that exits waits for its spans to be exported
# The trace context of the enqueue in progress in this thread, stored with each job it adds.
_carrier: ContextVar[dict[str, str] | None] = ContextVar("conveyor_trace_carrier", default=None)
_failed: set[str] = set()  # what already failed, logged once each


@functools.cache
def available() -> bool:
    """Whether ``opentelemetry-api`` is installed."""
    return find_spec("opentelemetry") is not None and find_spec("opentelemetry.trace") is not None


def _tracer() -> Any:
    """Conveyor's tracer, or None when no provider is configured (nothing would be kept)."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return _tracer_of(provider)


@functools.lru_cache(maxsize=4)
def _tracer_of(provider: Any) -> Any:
    """The provider's tracer for Conveyor, made once (not for every enqueue and run)."""
    return provider.get_tracer("conveyor")


def tracer() -> Any:
    """The tracer to make spans with now; None if tracing is off, absent or unconfigured."""
    if not available() or not getattr(settings, "CONVEYOR_TRACING", True):
        return None
    return _safely("find the tracer", _tracer)


def _safely[T](what: str, call: Callable[[], T]) -> T | None:
    try:
        return call()
    except Exception as e:  # OpenTelemetry's trouble must not become the job's
        if what not in _failed:
            _failed.add(what)
            logger.warning("Tracing could not %s, and goes on without: %r", what, e)
        return None


@functools.cache
def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def carrier() -> dict[str, str] | None:
    """The trace context to store with a job enqueued now, if any."""
    return _carrier.get()


@contextmanager
def _span(found: Any, name: str, **options: Any) -> Iterator[Any]:
    """A current span made by ``found``, or None if OpenTelemetry fails to make one. The
    body's own error goes through as it is; an error ending the span is only logged."""
    manager = _safely("start a span", lambda: found.start_as_current_span(name, **options))
    span = _safely("start a span", manager.__enter__) if manager is not None else None
    if span is None:
        yield None
        return
    assert manager is not None
    try:
        yield span
    except BaseException:
        error = sys.exc_info()
        _safely("end a span", lambda: manager.__exit__(*error))
        raise
    _safely("end a span", lambda: manager.__exit__(None, None, None))


@contextmanager
def enqueueing(task: Any, backend: str, count: int) -> Iterator[Any]:
    """A PRODUCER span around storing ``count`` calls of ``task``; None if there is none."""
    found = tracer()
    if found is None:
        yield None
        return
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
    options = {"kind": SpanKind.PRODUCER, "attributes": attributes, "record_exception": False}
    with _span(found, name, **options) as span:
        context: dict[str, str] = {}
        _safely("store the trace context", lambda: _propagator().inject(context))
        token = _carrier.set(context or None)
        try:
            yield span
        finally:
            _carrier.reset(token)


def enqueued(span: Any, results: list[Any]) -> None:
    """Name the job a single enqueue added on its span."""
    if span is not None and len(results) == 1:
        _safely("name the job", lambda: span.set_attribute("messaging.message.id", results[0].id))


@contextmanager
def running(job: Any) -> Iterator[Any]:
    """A CONSUMER span around one run of ``job``, its parent the span that enqueued it."""
    found = tracer()
    if found is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    stored = job.options.get("trace") if isinstance(job.options, Mapping) else None
    parent = None
    if isinstance(stored, Mapping):
        parent = _safely("read the trace context", lambda: _propagator().extract(stored))
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue_name,
        "messaging.message.id": job.id,
        "conveyor.task": job.task_path,
        "conveyor.backend": job.backend,
        "conveyor.attempt": job.attempt,
    }
    with _span(
        found,
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
    if span is not None:
        _safely("describe the run", lambda: _describe(span, outcome))


def _describe(span: Any, outcome: Any) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("conveyor.outcome", outcome.disposition.value)
    if outcome.error is None:
        return
    span.set_status(Status(StatusCode.ERROR, outcome.error.exception_class_path))
    if outcome.exception is not None:
        span.record_exception(outcome.exception)


def flush() -> None:
    """Export the spans still buffered: a worker process calls this before it exits."""
    if not available():
        return

    def force() -> None:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if hasattr(provider, "force_flush"):
            provider.force_flush(FLUSH_WAIT_MS)

    _safely("export the last spans", force)
