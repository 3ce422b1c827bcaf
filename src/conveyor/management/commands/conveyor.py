"""``manage.py conveyor worker|status|prune``: parse arguments, build a runtime object, run it."""

from __future__ import annotations

import os
from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, task_backends
from django.utils import timezone

from conveyor.backends.base import StoreBackend
from conveyor.records import QueueSelector


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


class Command(BaseCommand):
    help = "Run Conveyor workers and look at the queue."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        worker = sub.add_parser("worker", help="Run a supervised pool of worker processes.")
        self._backend_argument(worker)
        self._queue_arguments(worker)
        worker.add_argument(
            "--processes",
            type=positive_int,
            default=os.cpu_count() or 1,
            help="Worker processes to run (default: the CPU count).",
        )
        worker.add_argument(
            "--threads",
            type=positive_int,
            default=1,
            help="Threads per process, for I/O-bound tasks (default: 1).",
        )
        worker.add_argument("--until-done", action="store_true", help="Exit once no job is ready.")
        worker.add_argument(
            "--max-tasks-per-child",
            type=positive_int,
            default=None,
            help="Replace a worker process after it ran this many tasks.",
        )
        worker.add_argument(
            "--grace",
            type=positive_float,
            default=30.0,
            help="Seconds running tasks get to finish on stop (default: 30).",
        )
        worker.add_argument(
            "--progress", action="store_true", help="Show a progress bar and a summary at the end."
        )
        status = sub.add_parser("status", help="Show how many jobs are in each state.")
        self._backend_argument(status)
        self._queue_arguments(status)
        prune = sub.add_parser("prune", help="Delete finished jobs older than a number of days.")
        self._backend_argument(prune)
        prune.add_argument(
            "--older-than",
            type=float,
            default=7.0,
            metavar="DAYS",
            help="Delete jobs that finished more than DAYS ago (default: 7).",
        )

    def _backend_argument(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--backend",
            default=DEFAULT_TASK_BACKEND_ALIAS,
            help="The TASKS alias to use (default: 'default').",
        )

    def _queue_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--queue",
            action="append",
            dest="queues",
            metavar="NAME",
            help="Only take jobs from this queue (repeatable).",
        )
        parser.add_argument(
            "--exclude-queue",
            action="append",
            dest="exclude",
            metavar="NAME",
            help="Never take jobs from this queue (repeatable).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        backend = self._backend(options["backend"])
        action = options["action"]
        if action == "worker":
            raise SystemExit(self._worker(backend, options))
        if action == "status":
            self._status(backend, self._queues(backend, options))
        elif action == "prune":
            cutoff = timezone.now() - timedelta(days=options["older_than"])
            self.stdout.write(f"Deleted {backend.prune(cutoff)} finished job(s).")

    def _backend(self, alias: str) -> StoreBackend:
        try:
            backend = task_backends[alias]
        except Exception as e:
            raise CommandError(f"--backend {alias!r}: {e}") from e
        if not isinstance(backend, StoreBackend):
            raise CommandError(
                f"--backend {alias!r} is a {type(backend).__name__}, not a Conveyor backend."
            )
        return backend

    def _queues(self, backend: StoreBackend, options: dict[str, Any]) -> QueueSelector:
        include, exclude = options.get("queues"), options.get("exclude") or []
        if include and exclude:
            raise CommandError("--queue and --exclude-queue cannot be combined.")
        unknown = sorted(set(include or exclude) - backend.queues) if backend.queues else []
        if unknown:
            raise CommandError(
                f"Unknown queue(s) {', '.join(map(repr, unknown))} for backend "
                f"{backend.alias!r}; its QUEUES are "
                f"{', '.join(map(repr, sorted(backend.queues)))}."
            )
        return QueueSelector(
            include=frozenset(include) if include else None, exclude=frozenset(exclude)
        )

    def _worker(self, backend: StoreBackend, options: dict[str, Any]) -> int:
        from conveyor.runtime.supervisor import Supervisor, WorkerSettings

        settings = WorkerSettings(
            backend=backend.alias,
            queues=self._queues(backend, options),
            processes=options["processes"],
            threads=options["threads"],
            max_tasks_per_child=options["max_tasks_per_child"],
            until_done=options["until_done"],
            grace=options["grace"],
            progress=options["progress"],
        )
        return Supervisor(settings).run()

    def _status(self, backend: StoreBackend, queues: QueueSelector) -> None:
        from conveyor.monitoring import render_stats

        render_stats(backend.stats(queues), backend.alias, self.stdout)
