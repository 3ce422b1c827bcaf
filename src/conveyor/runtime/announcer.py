"""Send ``task_finished`` and run hooks for jobs that ended in the supervisor's hands.

When a supervisor saves the outcome of a worker process that died (or fails a job lost
too often), the task's own code (signal receivers, ``on_success``/``on_failure`` hooks)
must still run, but never in the supervisor: a slow hook there would hold its heartbeats
and time limits. A short-lived process of its own reads each result back and announces it.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence

from django.db import connections
from django.tasks import task_backends
from django.tasks.signals import task_finished

from conveyor import tracing
from conveyor.backends.base import StoreBackend
from conveyor.runtime.middleware import run_hooks
from conveyor.runtime.runner import send

logger = logging.getLogger(__name__)


def announce_main(alias: str, job_ids: Sequence[str]) -> None:
    """Entry point of an announcer process."""
    signal.set_wakeup_fd(-1)  # the supervisor's pipe, inherited over fork, is not ours
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    backend = task_backends[alias]
    assert isinstance(backend, StoreBackend)
    backend.after_fork()
    try:
        for job_id in job_ids:
            try:
                result = backend.get_result(job_id)
            except Exception:
                connections.close_all()
                logger.exception("Could not read back job %s to announce its end", job_id)
                continue
            send(backend, task_finished, result)
            run_hooks(result)
    finally:
        connections.close_all()
        tracing.flush()
