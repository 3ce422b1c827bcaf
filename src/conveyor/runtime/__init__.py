"""The worker runtime: supervisor, executor, invocation and middleware.

It sees only ``conveyor.backends.base``; a backend is found by alias through
``django.tasks.task_backends``.
"""
