"""How a supervisor stops: on signals, gracefully first, at once on a second one.

The supervisor is the only process that acts on signals. Its handler only counts them; the
signal also wakes the supervisor's sleep through the wake-up pipe, and the next cycle acts.
The first SIGTERM, SIGINT or SIGHUP asks every worker process to stop gracefully: running
tasks finish, up to the grace period. A second signal, or the end of the grace period,
kills them and puts their jobs back. Tasks that asked not to be waited for
(``sigkill_on_stop``) are stopped at once either way.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

from conveyor.runtime.child import STOP_SIGNALS
from conveyor.runtime.processes import Processes

logger = logging.getLogger(__name__)


class Stop:
    """The stop signals a supervisor received, and the stop they ask of its processes."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.signals = 0
        self.deadline: float | None = None
        self.forced = False

    def install(self, wake: int) -> None:
        """Count stop signals from now on; each one also writes to the pipe ``wake``."""
        os.set_blocking(wake, False)
        signal.set_wakeup_fd(wake)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def asked(self) -> bool:
        """Say whether a stop signal has come."""
        return self.signals > 0

    def handle(self, processes: Processes) -> None:
        """Carry the stop asked for on: gracefully first, at once when it is time."""
        if not self.signals or not processes.children:
            return
        if self.deadline is None:
            logger.info(
                "Stopping: running tasks finish (up to %.0fs); send the signal again "
                "to stop them now.",
                self.grace,
            )
            self.deadline = time.monotonic() + self.grace
            processes.signal_all(signal.SIGTERM)
        if self.signals > 1 or time.monotonic() >= self.deadline:
            self._force(processes)
            return
        processes.kill_those_stopping_at_once()

    def _force(self, processes: Processes) -> None:
        logger.warning(
            "Stopping now: %d worker process(es) are killed and their jobs put back.",
            len(processes.children),
        )
        self.forced = True
        processes.kill_all()
