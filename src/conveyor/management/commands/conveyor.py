"""``manage.py conveyor worker|status|monitor|schedules|cancel|prune``: parse, then act."""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, task_backends
from django.tasks.exceptions import TaskResultDoesNotExist
from django.utils import timezone

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.control import CancelOutcome, cancel
from conveyor.exceptions import ConveyorImproperlyConfigured, InvalidSchedule, ScheduleNotFound
from conveyor.management.arguments import (
    DEFAULT_GRACE,
    DEFAULT_INTERVAL,
    MAX_BATCH,
    MAX_DAYS,
    MAX_GRACE,
    MAX_INTERVAL,
    MAX_PROCESSES,
    MAX_TASKS,
    MAX_THREADS,
    MIN_INTERVAL,
    POOL_OPTIONS,
    QUEUE_VERBS,
    SCHEDULE_VERBS,
    listen_address,
    number,
    process_counts,
    whole,
    worker_settings,
)
from conveyor.monitoring import printable, render_schedules, render_stats
from conveyor.records import QueueSelector


class Command(BaseCommand):
    help = "Run Conveyor workers and look at the queue."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        self._worker_arguments(sub.add_parser("worker", help="Run workers that run the jobs."))
        status = sub.add_parser("status", help="Show how many jobs are in each state.")
        self._backend_argument(status)
        self._queue_arguments(status)
        status.add_argument(
            "--json",
            action="store_true",
            help="Print one JSON document: counts per queue, workers, schedules.",
        )
        monitor = sub.add_parser(
            "monitor",
            help="Watch the queue live: workers, queues, running jobs, rates, failures, schedules.",
        )
        self._monitor_arguments(monitor)
        prune = sub.add_parser(
            "prune",
            help="Delete finished jobs past their retention, and any older than a number of days.",
        )
        self._backend_argument(prune)
        prune.add_argument(
            "--older-than",
            type=number(0, MAX_DAYS),
            default=None,
            metavar="DAYS",
            help="Also delete every job that finished more than DAYS ago, whatever its "
            "retention (default: only jobs past their retention).",
        )
        prune.add_argument(
            "--batch",
            type=whole(1, MAX_BATCH),
            default=1000,
            metavar="N",
            help="Delete N jobs per transaction (default: 1000).",
        )

        queues = sub.add_parser(
            "queues", help="List queues with their counts; pause, resume, clear or dedupe one."
        )
        self._backend_argument(queues)
        queues.add_argument("verb", nargs="?", choices=QUEUE_VERBS, default="list")
        queues.add_argument("name", nargs="?", metavar="QUEUE", help="A queue's name.")
        queues.add_argument(
            "--for",
            dest="seconds",
            type=number(0, 10 * 365 * 86400.0, above=True),
            metavar="SECONDS",
            help="pause: for this long (default: until resumed).",
        )
        queues.add_argument(
            "--yes", action="store_true", help="clear: delete the jobs, without asking."
        )

        schedules = sub.add_parser(
            "schedules", help="List schedules and their next runs; run, pause or resume one."
        )
        self._backend_argument(schedules)
        schedules.add_argument(
            "verb",
            nargs="?",
            choices=SCHEDULE_VERBS,
            default="list",
            help="list (the default), run NAME now, pause NAME, resume NAME, or sync the "
            "code schedules into the store.",
        )
        schedules.add_argument("name", nargs="?", metavar="NAME", help="A schedule's name.")
        schedules.add_argument(
            "--retired", action="store_true", help="Also list code schedules no longer declared."
        )

        cancel = sub.add_parser("cancel", help="Cancel jobs by id (running ones are stopped).")
        self._backend_argument(cancel)
        cancel.add_argument("ids", nargs="+", metavar="ID", help="The result id of a job.")

    def _worker_arguments(self, worker: ArgumentParser) -> None:
        self._backend_argument(worker)
        self._queue_arguments(worker)
        worker.add_argument(
            "--processes",
            type=process_counts,
            metavar="N|QUEUE=N,...",
            help="Worker processes to run, or per queue, e.g. emails=2,reports=1 (default: "
            "OPTIONS['PROCESSES'], else the CPU count).",
        )
        worker.add_argument(
            "--machine",
            type=whole(1, MAX_PROCESSES),
            help="This machine's number, from 1, when --of machines share the processes.",
        )
        worker.add_argument(
            "--of",
            type=whole(1, MAX_PROCESSES),
            dest="machines",
            help="How many machines share the processes (each runs its share).",
        )
        worker.add_argument(
            "--config",
            metavar="FILE",
            help="A Python file of worker options for this host (PROCESSES, THREADS, ...); "
            "the command line overrides them.",
        )
        worker.add_argument(
            "--max-memory",
            type=number(1, 2**30, above=False),
            metavar="MIB",
            help="Replace a worker process once it holds more than MIB of memory.",
        )
        worker.add_argument(
            "--threads",
            type=whole(1, MAX_THREADS),
            help="Threads per process, for I/O-bound tasks (default: 1).",
        )
        worker.add_argument("--until-done", action="store_true", help="Exit once no job is ready.")
        worker.add_argument(
            "--max-tasks-per-child",
            type=whole(1, MAX_TASKS),
            default=None,
            help="Replace a worker process after it ran this many tasks "
            "(with --in-process: stop after this many).",
        )
        worker.add_argument(
            "--grace",
            type=number(0, MAX_GRACE, above=True),
            help=f"Seconds running tasks get to finish on stop (default: {DEFAULT_GRACE:g}).",
        )
        worker.add_argument(
            "--progress", action="store_true", help="Show a progress bar and a summary at the end."
        )
        worker.add_argument(
            "--metrics-port",
            type=listen_address,
            metavar="[HOST:]PORT",
            help="Serve Prometheus metrics of all this worker's processes and its backend's "
            "queues on PORT (every address unless HOST is given); needs prometheus-client.",
        )
        worker.add_argument(
            "--no-scheduler",
            action="store_true",
            help="Do not fire due schedules from this worker (others still do).",
        )
        worker.add_argument(
            "--in-process",
            action="store_true",
            help="Run jobs in this process on one thread, with no supervisor (for tests and "
            "scripts); a first Ctrl-C lets the running task finish.",
        )

    def _monitor_arguments(self, monitor: ArgumentParser) -> None:
        self._backend_argument(monitor)
        self._queue_arguments(monitor)
        monitor.add_argument(
            "--interval",
            type=number(MIN_INTERVAL, MAX_INTERVAL),
            default=DEFAULT_INTERVAL,
            metavar="SECONDS",
            help=f"Seconds between two looks at the store (default: {DEFAULT_INTERVAL:g}).",
        )
        monitor.add_argument(
            "--once", action="store_true", help="Print one view and exit (for scripts)."
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
            code = self._worker(backend, options)
            if code:
                raise SystemExit(code)
        elif action == "status":
            self._status(backend, self._queues(backend, options), options["json"])
        elif action == "monitor":
            code = self._monitor(backend, options)
            if code:
                raise SystemExit(code)
        elif action == "cancel":
            self._cancel(backend, options["ids"])
        elif action == "prune":
            self._prune(backend, options["older_than"], options["batch"])
        elif action == "schedules":
            self._schedules(backend, options["verb"], options["name"], options["retired"])
        elif action == "queues":
            self._queue_admin(backend, options["verb"], options["name"], options)

    def _queue_admin(
        self, backend: StoreBackend, verb: str, name: str | None, options: dict[str, Any]
    ) -> None:
        from conveyor import queues

        if verb == "list":
            paused = backend.paused_queues()
            render_stats(backend.stats(), backend.alias, self.stdout)
            for queue, until in sorted(paused.items()):
                end = until.isoformat(timespec="seconds") if until else "resumed"
                self.stdout.write(f"{printable(queue)}: paused until {end}")
            return
        if not name:
            raise CommandError(f"`queues {verb}` needs the name of a queue.")
        try:
            if verb == "pause":
                until = queues.pause(name, seconds=options["seconds"], backend=backend.alias)
                end = until.isoformat(timespec="seconds") if until else "it is resumed"
                self.stdout.write(f"Queue {printable(name)!r} paused until {end}.")
            elif verb == "resume":
                was = queues.resume(name, backend=backend.alias)
                self.stdout.write(
                    f"Queue {printable(name)!r} {'resumed' if was else 'was not paused'}."
                )
            elif verb == "clear":
                if not options["yes"]:
                    raise CommandError(
                        f"`queues clear` deletes every job of {printable(name)!r} that has not "
                        "started; add --yes to do it."
                    )
                count = queues.clear(name, backend=backend.alias)
                self.stdout.write(f"Deleted {count} job(s) of queue {printable(name)!r}.")
            else:
                count = queues.remove_duplicates(name, backend=backend.alias)
                self.stdout.write(f"Deleted {count} duplicate job(s) of {printable(name)!r}.")
        except (ValueError, ConveyorImproperlyConfigured) as e:
            raise CommandError(printable(str(e))) from e

    def _backend(self, alias: str) -> StoreBackend:
        try:
            backend = task_backends[alias]
        except Exception as e:
            raise CommandError(f"--backend {alias!r}: {printable(str(e))}") from e
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
        if backend.runs_inline:
            raise CommandError(
                f"--backend {backend.alias!r} is a {type(backend).__name__}, which runs each "
                "task when it is enqueued: it has no worker to start."
            )
        if options["in_process"]:
            return self._in_process(backend, options)
        from conveyor.runtime.supervisor import Supervisor

        try:
            settings = worker_settings(backend, self._queues, options)
        except ConveyorImproperlyConfigured as e:
            raise CommandError(str(e)) from e
        return Supervisor(settings).run()

    def _in_process(self, backend: StoreBackend, options: dict[str, Any]) -> int:
        from conveyor.runtime.inprocess import InProcessWorker

        given = [flag for name, flag in POOL_OPTIONS.items() if options[name]]
        if given:
            raise CommandError(
                f"--in-process runs jobs in this process on one thread; it cannot be combined "
                f"with {', '.join(given)}."
            )
        worker = InProcessWorker(
            backend.alias,
            self._queues(backend, options),
            until_done=options["until_done"],
            max_tasks=options["max_tasks_per_child"],
            stop_on_signals=True,
            scheduler=not options["no_scheduler"],
        )
        code = worker.run()
        done = worker.summary
        self.stdout.write(
            f"Ran {done.ran} job(s): {done.succeeded} succeeded, {done.failed} failed, "
            f"{done.retried} to retry."
        )
        return code

    def _monitor(self, backend: StoreBackend, options: dict[str, Any]) -> int:
        from rich.console import Console

        from conveyor.monitor import Monitor

        # The stream itself, not Django's wrapper, which would end each of rich's writes
        # with a newline.
        console = Console(file=options.get("stdout") or sys.stdout)
        return Monitor(
            backend,
            self._queues(backend, options),
            interval=options["interval"],
            once=options["once"],
            console=console,
        ).run()

    def _cancel(self, backend: StoreBackend, ids: list[str]) -> None:
        unknown = []
        for result_id in ids:
            try:
                done = cancel(result_id, backend.alias)
            except TaskResultDoesNotExist:
                unknown.append(result_id)
                continue
            said = {
                CancelOutcome.CANCELLED: "cancelled before it ran",
                CancelOutcome.STOPPING: "running: asked to stop",
                CancelOutcome.FINISHED: "had already finished",
            }[done]
            self.stdout.write(f"{printable(result_id)}: {said}")
        if unknown:
            shown = ", ".join(printable(i) for i in unknown)
            raise CommandError(f"No job with id {shown} in backend {backend.alias!r}.")

    def _prune(self, backend: StoreBackend, days: float | None, batch: int) -> None:
        expired = backend.expire(batch=batch)
        self.stdout.write(f"Deleted {expired} job(s) kept past their retention.")
        if days is not None:
            deleted = backend.prune(timezone.now() - timedelta(days=days), batch=batch)
            self.stdout.write(f"Deleted {deleted} finished job(s) older than {days:g} day(s).")

    def _schedules(self, backend: StoreBackend, verb: str, name: str | None, retired: bool) -> None:
        from conveyor import schedules

        if verb in ("list", "sync"):
            if name:
                raise CommandError(f"`schedules {verb}` takes no NAME.")
            if verb == "sync":
                report = schedules.sync(backend.alias)
                self.stdout.write(
                    f"Added {len(report.added)}, updated {len(report.changed)}, retired "
                    f"{len(report.retired)} code schedule(s)."
                )
            render_schedules(backend.schedules(retired=retired), backend.alias, self.stdout)
            return
        if not name:
            raise CommandError(f"`schedules {verb}` needs the NAME of a schedule.")
        try:
            if verb == "run":
                result = schedules.run(name, backend=backend.alias)
                self.stdout.write(f"Schedule {printable(name)!r}: enqueued job {result.id}.")
            else:
                getattr(schedules, verb)(name, backend=backend.alias)
                self.stdout.write(f"Schedule {printable(name)!r}: {verb}d.")
        except (ScheduleNotFound, InvalidSchedule) as e:
            raise CommandError(printable(str(e))) from e

    def _status(self, backend: StoreBackend, queues: QueueSelector, as_json: bool) -> None:
        if not as_json:
            render_stats(backend.stats(queues), backend.alias, self.stdout)
            return
        from conveyor.monitor import status_document

        document = status_document(
            backend.stats(queues),
            backend.workers(),
            backend.schedules(),
            backend=backend.alias,
            queues=[name for name in backend.queues if queues.allows(name)],
            now=clock.now(),
            lease=backend.conveyor_options.lease,
        )
        # ASCII only: a name cannot reach the terminal as anything but a JSON escape.
        self.stdout.write(json.dumps(document, indent=2))
