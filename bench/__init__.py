"""Benchmarks of Conveyor's DatabaseBackend against django-tasks-db (``python -m bench``)."""
