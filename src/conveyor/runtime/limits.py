"""Soft time limits: ``SoftTimeLimitExceeded`` raised inside a task that runs too long.

On a process's main thread a timer signal (SIGALRM) raises it, and interrupts a sleep or a
blocking call that Python retries. On any other thread it is raised asynchronously: it
lands at the next Python instruction the thread runs, so a thread blocked in one long C
call (a socket read without a timeout, say) sees it only when that call returns. The hard
limit (``timeout``), enforced by the supervisor, stops such a task either way.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from types import FrameType

from conveyor.exceptions import SoftTimeLimitExceeded


class SoftLimit:
    """A soft limit of ``seconds`` around one call: ``arm()`` before it, ``disarm()`` after.

    Use both in ``try``/``finally`` inside the code that turns the call's exceptions into
    its outcome: the exception may land anywhere from ``arm()`` to ``disarm()``.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.armed = False
        self.fired = False
        self.thread = threading.get_ident()
        self.timer: threading.Timer | None = None
        self.previous: object = None
        self.by_signal = False

    def arm(self) -> None:
        if not self.seconds:
            return
        self.by_signal = threading.current_thread() is threading.main_thread() and signal.getsignal(
            signal.SIGALRM
        ) in (signal.SIG_DFL, None)
        if self.by_signal:
            self.previous = signal.signal(signal.SIGALRM, self._on_signal)
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        else:
            self.armed = True
            self.timer = threading.Timer(self.seconds, self._raise_in_thread)
            self.timer.daemon = True
            self.timer.start()

    def disarm(self) -> None:
        if not self.seconds:
            return
        with self.lock:
            self.armed = False
            if self.fired and not self.by_signal:  # not raised yet: never outside the call
                _set_async_exc(self.thread, None)
        if self.by_signal:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)  # type: ignore[arg-type]
        elif self.timer is not None:
            self.timer.cancel()

    def _error(self) -> SoftTimeLimitExceeded:
        return SoftTimeLimitExceeded(f"the task ran past its soft time limit of {self.seconds:g}s")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise self._error()

    def _raise_in_thread(self) -> None:
        with self.lock:
            if self.armed:
                self.fired = True
                _set_async_exc(self.thread, SoftTimeLimitExceeded)


def _set_async_exc(thread: int, kind: type[BaseException] | None) -> None:
    """Raise ``kind`` in ``thread`` at its next instruction (None: cancel a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), ctypes.py_object(kind) if kind is not None else None
    )
