"""The database backend: ``conveyor.backends.database.DatabaseBackend``."""

from conveyor.backends.database.backend import DatabaseBackend, DatabaseOptions

__all__ = ["DatabaseBackend", "DatabaseOptions"]
