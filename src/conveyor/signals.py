"""Conveyor's own signals, beside Django's ``task_enqueued``, ``task_started`` and
``task_finished`` (which Conveyor sends as Django's backends do).

``task_retried`` is sent by a worker once it has saved that a failed (or snoozed) run of a job
will run again: ``sender`` is the backend's class, ``task_result`` the job (as it ran; for a
run the supervisor ended, at its time limit or with its process, as read back afterwards),
``error`` the ``TaskError`` of the run (None for a snooze), ``retry_at`` when it runs again,
and ``started_at`` and ``finished_at`` the times of the run.
"""

from django.dispatch import Signal

task_retried = Signal()
