"""OpenTelemetry: a span around each enqueue, and one around each run, parented across them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.tasks import TaskResultStatus, task_backends
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor import bulk_enqueue, call, tracing
from conveyor.backends.database.models import Job
from conveyor.testing import run_until_done
from tests.helpers import job
from tests.testapp import tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def provider() -> TracerProvider:
    return TracerProvider()


@pytest.fixture(autouse=True)
def spans(provider, monkeypatch) -> Iterator[InMemorySpanExporter]:
    """The spans ended in the test, recorded by OpenTelemetry's SDK.

    The provider is this test's, not the process's global one (which can be set only once,
    and would then trace every later test's jobs).
    """
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", lambda: provider.get_tracer("conveyor"))
    yield exporter
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_run_is_traced_as_the_child_of_the_enqueue_and_of_the_request(spans, provider):
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("POST /orders") as request:
        result = tasks.add.enqueue(2, 3)
    run_until_done()

    [enqueue] = named(spans, "enqueue tests.testapp.tasks.add")
    [run] = named(spans, "run tests.testapp.tasks.add")
    assert enqueue.kind == SpanKind.PRODUCER and run.kind == SpanKind.CONSUMER
    assert enqueue.parent.span_id == request.get_span_context().span_id
    assert run.parent.span_id == enqueue.context.span_id
    assert run.context.trace_id == request.get_span_context().trace_id
    assert enqueue.attributes["messaging.message.id"] == result.id
    assert enqueue.attributes["messaging.destination.name"] == "default"
    assert run.attributes["messaging.message.id"] == result.id
    assert run.attributes["conveyor.task"] == "tests.testapp.tasks.add"
    assert run.attributes["conveyor.attempt"] == 1
    assert run.attributes["conveyor.outcome"] == "succeeded"
    assert run.status.status_code == StatusCode.UNSET
    assert job(result).return_value == 5


def test_a_failed_run_records_its_error(spans):
    tasks.explode.enqueue("boom")
    run_until_done()
    [run] = named(spans, "run tests.testapp.tasks.explode")
    assert run.status.status_code == StatusCode.ERROR
    assert run.status.description == "builtins.ValueError"
    assert run.attributes["conveyor.outcome"] == "failed"
    [event] = run.events
    assert event.name == "exception" and event.attributes["exception.message"] == "boom"


def test_a_retried_run_says_so(spans, tmp_path):
    tasks.fails_twice.enqueue(str(tmp_path / "tries"))
    run_until_done()
    [run] = named(spans, "run tests.testapp.tasks.fails_twice")
    assert run.attributes["conveyor.outcome"] == "retry"
    assert run.status.status_code == StatusCode.ERROR


def test_a_bulk_enqueue_is_one_span_parent_of_every_run(spans):
    bulk_enqueue(tasks.add, [call(i, i) for i in range(4)])
    run_until_done()
    [enqueue] = named(spans, "enqueue tests.testapp.tasks.add")
    runs = named(spans, "run tests.testapp.tasks.add")
    assert enqueue.attributes["messaging.batch.message_count"] == 4
    assert len(runs) == 4 and {r.parent.span_id for r in runs} == {enqueue.context.span_id}


def test_tracing_can_be_turned_off(spans, settings):
    settings.CONVEYOR_TRACING = False
    result = tasks.add.enqueue(1, 1)
    run_until_done()
    assert spans.get_finished_spans() == ()
    assert "trace" not in Job.objects.get(uuid=result.id).options
    assert task_backends["default"].get_result(result.id).return_value == 2


def test_an_error_that_cannot_be_printed_fails_its_job_not_the_worker(spans):
    result = tasks.raises_unprintable.enqueue()
    summary = run_until_done()
    assert summary.failed == 1
    assert job(result).status == TaskResultStatus.FAILED
    [run] = named(spans, "run tests.testapp.tasks.raises_unprintable")
    assert run.status.status_code == StatusCode.ERROR


def test_broken_tracing_never_stands_in_the_way(spans, monkeypatch, caplog):
    def broken():
        raise ValueError("no such propagator: b3")

    monkeypatch.setattr(tracing, "_propagator", broken)
    monkeypatch.setattr(tracing, "_failed", set())
    result = tasks.add.enqueue(1, 2)
    run_until_done()
    assert job(result).return_value == 3
    assert "Tracing could not store the trace context" in caplog.text
    [run] = named(spans, "run tests.testapp.tasks.add")
    assert run.parent is None  # no context stored: the run starts a trace of its own


def test_no_span_and_no_context_without_a_configured_provider(monkeypatch):
    monkeypatch.undo()  # the process's own provider: none was configured
    result = tasks.add.enqueue(1, 1)
    assert tracing.tracer() is None
    assert "trace" not in Job.objects.get(uuid=result.id).options
    run_until_done()
    assert job(result).return_value == 2
