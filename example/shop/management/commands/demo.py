"""Enqueue a batch of example tasks, then run a worker with a progress bar until done."""

from argparse import ArgumentParser
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand

import conveyor
from shop import tasks


class Command(BaseCommand):
    help = "Enqueue example tasks and run Conveyor's worker until they are all done."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--count",
            type=int,
            default=2000,
            help="How many tasks of each kind to enqueue (default: 2000).",
        )
        parser.add_argument(
            "--processes", type=int, default=2, help="Worker processes (default: 2)."
        )

    def handle(self, *args: Any, count: int, processes: int, **options: Any) -> None:
        conveyor.bulk_enqueue(tasks.send_welcome_email, [(i,) for i in range(count)])
        conveyor.bulk_enqueue(tasks.make_thumbnail, [(i,) for i in range(count)])
        conveyor.bulk_enqueue(tasks.charge_order, [(i,) for i in range(1, count + 1)])
        for currency in ("EUR", "USD", "GBP"):
            tasks.fetch_exchange_rate.enqueue(currency)
        self.stdout.write(f"Enqueued {3 * count + 3} tasks; running the worker...")
        try:
            call_command(
                "conveyor", "worker", "--until-done", "--progress", "--processes", str(processes)
            )
        except SystemExit as stop:
            if stop.code:
                raise
        self.stdout.write("See the queue any time with: python example/manage.py conveyor status")
