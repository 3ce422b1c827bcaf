"""The Django admin for Conveyor's tables: jobs, schedules, workers and paused queues.

Registered only where ``django.contrib.admin`` is installed. The pages hold no queue logic:
every change goes through Conveyor's API (``enqueue_again``, ``cancel``, ``schedules``) or
a store's verbs (``run_now``, ``add_schedule``, ``change_schedule``).
"""

from django.apps import apps

if apps.is_installed("django.contrib.admin"):
    from conveyor.admin import jobs, queues, schedules, workers  # noqa: F401  (they register)
