"""A web dashboard for staff: queues, throughput, running jobs, failures, workers, schedules.

Mounted by a project with ``path("conveyor/", include("conveyor.dashboard.urls"))``. It reads
every backend the same way, through the store's verbs (``conveyor.monitor.Watcher`` and
``throughput()``), and acts through Conveyor's API (``enqueue_again``, ``cancel``,
``schedules``): it holds no queue logic. Its script and style ship in ``static/``.
"""
