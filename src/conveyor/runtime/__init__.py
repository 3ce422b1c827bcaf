"""The worker runtime: supervisor, child processes, claim loop, runner and recorder.

It sees only ``conveyor.backends.base`` (and ``conveyor.backends.tasks``); a backend is
found by alias through ``django.tasks.task_backends``.
"""
