"""The in-process store: the database backend's twin, for tests and eager mode.

``tables`` holds the rows and the bookkeeping the verbs share; ``backend`` the verbs, with
the mixins ``deliveries``, ``controls``, ``housekeeping``, ``queues`` and ``schedules``.
Settings name the backend ``conveyor.backends.memory.MemoryBackend``.
"""

from conveyor.backends.memory.backend import MemoryBackend

__all__ = ["MemoryBackend"]
