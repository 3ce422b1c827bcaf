"""Prometheus metrics: what happens to jobs, counted where it happens, and the stores' depths.

Optional: ``pip install "django-conveyor[metrics]"`` (``prometheus-client``). Where it is
installed, every process counts the jobs it enqueues, starts and ends (through Django's task
signals and ``conveyor.signals.task_retried``), and times their runs and pickups; turn that off
with ``CONVEYOR_METRICS = False``. The numbers are served two ways:

- by a worker, ``manage.py conveyor worker --metrics-port PORT``: the supervisor gathers the
  samples of all its processes and adds its backend's queue depths
  (``conveyor.runtime.exporter``);
- by ``conveyor.metrics.view`` in a project's URLs: the web process's own counts (all of a
  server's processes with ``PROMETHEUS_MULTIPROC_DIR`` set) and every backend's depths.

Nothing here imports ``prometheus_client`` until it is needed, so that a worker can choose the
multiprocess mode before the first sample exists.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib.util import find_spec
from typing import Any

from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.tasks import TaskResult, TaskResultStatus, task_backends
from django.tasks.signals import task_enqueued, task_finished, task_started

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.monitor import stores
from conveyor.signals import task_retried

logger = logging.getLogger(__name__)

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
PICKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STATES = ("ready", "scheduled", "running")
REUSE = 5.0  # seconds a worker's endpoint serves what it read of the store again
FAILURE_LOG_EVERY = 60.0  # seconds between two log lines about jobs that could not be counted


def available() -> bool:
    """Whether ``prometheus_client`` is installed."""
    return find_spec("prometheus_client") is not None


def enabled() -> bool:
    """Whether jobs are counted in this process: installed, and not turned off."""
    return available() and counting()


def counting() -> bool:
    """Whether jobs are counted now (``CONVEYOR_METRICS``, read at each job)."""
    return bool(getattr(settings, "CONVEYOR_METRICS", True))


# --- the counters and histograms, made on first use ---------------------------------------------


@dataclass(frozen=True, slots=True)
class JobMetrics:
    registry: Any
    enqueued: Any
    started: Any
    succeeded: Any
    failed: Any
    retried: Any
    run_seconds: Any
    pickup_seconds: Any

    @property
    def all(self) -> tuple[Any, ...]:
        return (
            self.enqueued,
            self.started,
            self.succeeded,
            self.failed,
            self.retried,
            self.run_seconds,
            self.pickup_seconds,
        )


@functools.cache
def jobs() -> JobMetrics:
    """This process's job metrics, in a registry of Conveyor's own."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry(auto_describe=False)
    labels = ("backend", "queue", "task")

    def counter(name: str, what: str) -> Any:
        return Counter(f"conveyor_jobs_{name}", what, labels, registry=registry)

    return JobMetrics(
        registry=registry,
        enqueued=counter("enqueued", "Jobs enqueued."),
        started=counter("started", "Runs of jobs started (each attempt)."),
        succeeded=counter("succeeded", "Jobs that ended successful."),
        failed=counter("failed", "Jobs that ended failed or cancelled."),
        retried=counter("retried", "Runs that failed or snoozed and will run again."),
        run_seconds=Histogram(
            "conveyor_job_run_seconds",
            "How long each run of a job took, from its start to its end.",
            labels,
            buckets=RUN_BUCKETS,
            registry=registry,
        ),
        pickup_seconds=Histogram(
            "conveyor_job_pickup_seconds",
            "How long a job waited from when it could run (enqueued, or due) to its first start.",
            ("backend", "queue"),
            buckets=PICKUP_BUCKETS,
            registry=registry,
        ),
    )


def _labels(result: TaskResult) -> tuple[str, str, str]:
    return result.backend, result.task.queue_name, result.task.module_path


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # (metric, labels) -> its child


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    """``metric.labels(*labels)``, kept: finding a child again costs a dict lookup."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((clock.aware(end) - clock.aware(start)).total_seconds(), 0.0)


def _on_enqueued(sender: Any, task_result: TaskResult, **kwargs: Any) -> None:
    _child(jobs().enqueued, _labels(task_result)).inc()


def _on_started(sender: Any, task_result: TaskResult, **kwargs: Any) -> None:
    m = jobs()
    _child(m.started, _labels(task_result)).inc()
    if len(task_result.worker_ids) <= 1:  # a first run: it waited from when it could run
        run_after = task_result.task.run_after
        ready = task_result.enqueued_at
        if ready is not None and run_after is not None:
            ready = max(clock.aware(ready), clock.aware(run_after))
        wait = _seconds(ready, task_result.last_attempted_at or task_result.started_at)
        if wait is not None:
            queue = (task_result.backend, task_result.task.queue_name)
            _child(m.pickup_seconds, queue).observe(wait)


def _on_finished(sender: Any, task_result: TaskResult, **kwargs: Any) -> None:
    m = jobs()
    labels = _labels(task_result)
    ended = m.succeeded if task_result.status == TaskResultStatus.SUCCESSFUL else m.failed
    _child(ended, labels).inc()
    ran = _seconds(task_result.last_attempted_at, task_result.finished_at)
    if ran is not None:
        _child(m.run_seconds, labels).observe(ran)


def _on_retried(
    sender: Any,
    task_result: TaskResult,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    **kwargs: Any,
) -> None:
    m = jobs()
    labels = _labels(task_result)
    _child(m.retried, labels).inc()
    ran = _seconds(started_at, finished_at)
    if ran is not None:
        _child(m.run_seconds, labels).observe(ran)


def _guarded(count: Callable[..., None]) -> Callable[..., None]:
    """A receiver that never fails its sender: counting is not worth an enqueue or a job.

    A failure (a samples directory removed or full, say) is logged once a minute at most.
    """

    def receiver(sender: Any, **kwargs: Any) -> None:
        if not counting():
            return
        try:
            count(sender, **kwargs)
        except Exception as e:
            now = time.monotonic()
            if now >= _last_failure[0] + FAILURE_LOG_EVERY:
                _last_failure[0] = now
                logger.warning("Metrics: a job could not be counted: %r", e)

    receiver.__name__ = count.__name__.lstrip("_")
    return receiver


on_enqueued = _guarded(_on_enqueued)
on_started = _guarded(_on_started)
on_finished = _guarded(_on_finished)
on_retried = _guarded(_on_retried)
_last_failure = [-FAILURE_LOG_EVERY]


def connect() -> None:
    """Count jobs in this process (called when Conveyor's app is ready, if enabled)."""
    for signal, receiver in (
        (task_enqueued, on_enqueued),
        (task_started, on_started),
        (task_finished, on_finished),
        (task_retried, on_retried),
    ):
        signal.connect(receiver, dispatch_uid=f"conveyor.metrics.{receiver.__name__}")


# --- what the stores hold, read at each scrape ----------------------------------------------------


class StoreCollector:
    """Queue depths by state, workers online and paused queues, read from stores when scraped.

    A store that cannot be read gives ``conveyor_store_up 0`` and no other sample.
    """

    def __init__(
        self, aliases: Iterable[str], *, own_thread: bool = False, lock: Any = None
    ) -> None:
        """``own_thread``: each scrape comes on a thread of the collector's own, whose
        connections it closes (a request's are Django's to close); one scrape reads the
        stores at a time (under ``lock``), and what it read serves the scrapes of the next
        ``REUSE`` seconds, however many come."""
        self.aliases = tuple(aliases)
        self.own_thread = own_thread
        self.lock = lock or threading.Lock()
        self.read_at = -REUSE
        self.last: tuple[Any, ...] = ()

    def describe(self) -> list[Any]:
        """The families, without samples (a scrape that asks for some by name finds them)."""
        return list(_gauges())

    def collect(self) -> Iterator[Any]:
        if not self.own_thread:
            yield from self._families()
            return
        # One scrape reads at a time; the others serve what was read last meanwhile.
        if time.monotonic() - self.read_at >= REUSE and self.lock.acquire(blocking=False):
            try:
                self.last = tuple(self._families())
                self.read_at = time.monotonic()
            finally:
                connections.close_all()  # this thread's only
                self.lock.release()
        yield from self.last

    def _families(self) -> Iterator[Any]:
        up, depth, paused, workers = _gauges()
        for alias in self.aliases:
            up.add_metric([alias], 1.0 if self._read(alias, depth, paused, workers) else 0.0)
        yield from (up, depth, paused, workers)

    def _read(self, alias: str, depth: Any, paused: Any, workers: Any) -> bool:
        from conveyor.monitoring import online

        try:
            backend = task_backends[alias]
            assert isinstance(backend, StoreBackend)
            now = clock.now()
            with backend.reading():
                stats = backend.stats(finished_since=now)
                held = backend.paused_queues()
                found = backend.workers()
        except Exception as e:  # any store, any driver: the scrape goes on
            logger.warning("Metrics: backend %r could not be read: %s", alias, e)
            return False
        for queue in sorted(set(backend.queues) | set(stats.by_queue)):
            counts = stats.by_queue.get(queue, {})
            for state in STATES:
                depth.add_metric([alias, queue, state], float(counts.get(state, 0)))
            paused.add_metric([alias, queue], 1.0 if queue in held else 0.0)
        lease = backend.conveyor_options.lease
        for kind in ("supervisor", "process"):
            count = sum(1 for w in found if w.kind == kind and online(w, now, lease))
            workers.add_metric([alias, kind], float(count))
        return True


def _gauges() -> tuple[Any, Any, Any, Any]:
    from prometheus_client.core import GaugeMetricFamily

    return (
        GaugeMetricFamily("conveyor_store_up", "1 if the store could be read.", labels=["backend"]),
        GaugeMetricFamily(
            "conveyor_queue_jobs",
            "Jobs in a queue now, by state (ready includes waiting jobs).",
            labels=["backend", "queue", "state"],
        ),
        GaugeMetricFamily(
            "conveyor_queue_paused",
            "1 if workers take no jobs from the queue.",
            labels=["backend", "queue"],
        ),
        GaugeMetricFamily(
            "conveyor_workers_online",
            "Worker processes and supervisors that beat within the lease.",
            labels=["backend", "kind"],
        ),
    )


def job_families() -> list[Any]:
    """The job metrics' families, without samples: what a collector of them describes."""
    return [metric.describe()[0] for metric in jobs().all]


def exposition(aliases: Iterable[str]) -> tuple[bytes, str]:
    """The job metrics of this process (of all processes, in multiprocess mode) and the
    stores' depths, in Prometheus' text format; and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROCESS):
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)
    else:
        registry.register(jobs().registry)
    registry.register(StoreCollector(aliases))
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --- the endpoint of a project --------------------------------------------------------------------


def view(request: HttpRequest) -> HttpResponse:
    """``path("metrics/", conveyor.metrics.view)``: for Prometheus, or a staff user.

    With ``CONVEYOR_METRICS_TOKEN`` set, a request bearing ``Authorization: Bearer TOKEN`` is
    served; without it, only a logged-in staff user is.
    """
    if not available():
        return HttpResponse(
            "prometheus-client is not installed: pip install 'django-conveyor[metrics]'.\n",
            status=501,
            content_type="text/plain",
        )
    if not _allowed(request):
        response = HttpResponse("Not allowed.\n", status=403, content_type="text/plain")
        if getattr(settings, "CONVEYOR_METRICS_TOKEN", None):
            response = HttpResponse("Unauthorized.\n", status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="conveyor metrics"'
        return response
    body, content_type = exposition(stores())
    return HttpResponse(body, content_type=content_type)


def _allowed(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    token = getattr(settings, "CONVEYOR_METRICS_TOKEN", None)
    given = request.headers.get("Authorization", "")
    if not token or not given.startswith("Bearer "):
        return False
    return hmac.compare_digest(given.removeprefix("Bearer ").encode(), str(token).encode())
