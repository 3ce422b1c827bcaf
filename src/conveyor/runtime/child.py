"""A worker process's start-up: signals, its supervisor, its store; then the loop.

Stop signals arrive blocked across the fork (so none is handled by the supervisor's
handler in the child). The child installs its own handlers, which only note the signal on
a wake-up pipe, and then unblocks them: tasks run with an empty signal mask, so processes
they start can be stopped with SIGTERM or SIGINT as usual. A thread reads the pipe:
SIGTERM asks the loop to stop gracefully; SIGINT and SIGHUP (a terminal's Ctrl-C or
hang-up, sent to the whole process group) are left to the supervisor, which stops the
children in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import signal
import sys
import threading
import time
from types import FrameType

from django.db import connections
from django.tasks import task_backends

from conveyor import tracing
from conveyor.backends.base import StoreBackend
from conveyor.runtime import exporter
from conveyor.runtime.channel import Slots
from conveyor.runtime.loop import EXIT_ORPHANED, Loop, WorkerConfig

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
PR_SET_PDEATHSIG = 1


def child_main(alias: str, config: WorkerConfig, slots: Slots) -> None:
    """Entry point of a worker process."""
    exporter.take_slot(config.place)
    _die_with_parent(config.parent_pid)
    backend = task_backends[alias]
    assert isinstance(backend, StoreBackend)  # the supervisor checked it
    backend.after_fork()
    loop = Loop(backend, config, slots)
    _take_signals(loop)
    slots.mark_ready()
    time.sleep(random.uniform(0, 0.02))  # spread the first claims of sibling processes
    code = loop.run()
    connections.close_all()
    tracing.flush()  # the process ends with os._exit: no exit handler exports them
    sys.exit(code)


def _noted(signum: int, frame: FrameType | None) -> None:
    """The signal was written to the wake-up pipe; the watcher thread acts on it."""


def _take_signals(loop: Loop) -> None:
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)  # replaces the supervisor's pipe, inherited over fork
    for signum in STOP_SIGNALS:
        signal.signal(signum, _noted)
    threading.Thread(
        target=_watch_signals, args=(read, loop), daemon=True, name="conveyor-signals"
    ).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _watch_signals(read: int, loop: Loop) -> None:
    while True:
        try:
            data = os.read(read, 64)
        except InterruptedError:
            continue
        if not data:
            return
        if signal.SIGTERM in data:
            loop.request_stop()


def _die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel kill this process if the supervisor dies (Linux).

    Nobody renews this process's leases once its supervisor is gone, so another worker may
    take its jobs over; it must not go on running them.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)
