"""A worker's Prometheus endpoint: the samples of all its processes, and its backend's queues.

The supervisor starts it before it forks any process. From then on every process of the
worker writes its samples to files in one directory (prometheus-client's multiprocess mode),
named after its slot rather than its pid: a process that replaces another (recycled,
crashed) takes over its files, so counters go on from where the last one stopped and the
directory holds a few files however often processes are replaced. The directory is the
supervisor's own, made in ``CONVEYOR_METRICS_DIR`` (else the system's temporary directory)
and locked while it or any process it started lives: removed when it stops, or by the next
supervisor to start if it was killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings

from conveyor import metrics

logger = logging.getLogger(__name__)

PREFIX = "conveyor-metrics-"
FRESH = 60.0  # seconds: a directory younger than this is never taken for a stale one
LOCK = ".in-use"  # locked (flock) by the supervisor that writes to the directory
# The name this process's sample files carry, and the process that took it: a process forked
# later writes under its own pid until it takes a slot of its own.
_slot: tuple[str, int] = ("", 0)


_active: Exporter | None = None  # the endpoint this process serves, if any


FORK_WAIT = 0.2  # longest a fork waits for a scrape's reads to end; later, it is put off


@contextlib.contextmanager
def forking() -> Iterator[bool]:
    """Around a fork of the supervisor: True if it may fork now, scrapes being held off
    meanwhile, so that the new process inherits no half-used database connection of a
    scrape's thread; False while a scrape is reading (the fork is to be tried later: the
    supervisor never waits on a store that hangs)."""
    lock = _active.lock if _active is not None else None
    if lock is None:
        yield True
        return
    if not lock.acquire(timeout=FORK_WAIT):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def identity() -> str:
    """The name of this process's sample files: its slot, else its pid."""
    name, pid = _slot
    return name if name and pid == os.getpid() else str(os.getpid())


def take_slot(name: str) -> None:
    """Write this process's samples under ``name`` (a process the supervisor started)."""
    global _slot
    _slot = (name, os.getpid())


class Exporter:
    """An HTTP server thread in the supervisor that serves ``/metrics``."""

    def __init__(self, alias: str, address: str, port: int) -> None:
        if not metrics.available():
            raise RuntimeError(
                "--metrics-port needs prometheus-client: pip install 'django-conveyor[metrics]'."
            )
        from prometheus_client import CollectorRegistry

        self.lock = threading.Lock()  # held by a scrape's reads, and across each fork
        self.directory: str | None = None
        self.made = False
        self.held: int | None = None  # the open lock file of the directory
        self.saved: tuple[str | None, Any] | None = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Processes(self))
        registry.register(metrics.StoreCollector([alias], own_thread=True, lock=self.lock))
        self.server: Any = _serve(registry, address, port)
        self.port: int = self.server.server_address[1]
        try:
            self._use_directory()
        except Exception:
            self.close()
            raise
        os.register_at_fork(after_in_child=self._in_child)
        global _active
        _active = self

    def _use_directory(self) -> None:
        from prometheus_client import values

        parent = Path(getattr(settings, "CONVEYOR_METRICS_DIR", None) or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent)
        self.directory = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
        self.made = True
        # Held while this supervisor (or a process it forked) lives: the directory is in use.
        self.held = os.open(Path(self.directory) / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.saved = (os.environ.get(metrics.MULTIPROCESS), values.ValueClass)
        os.environ[metrics.MULTIPROCESS] = self.directory
        values.ValueClass = values.MultiProcessValue(identity)
        take_slot("supervisor")
        metrics.jobs.cache_clear()  # made again, with values kept in files

    def _in_child(self) -> None:
        if self.server is not None:  # its sockets are the supervisor's alone
            self.server.socket.close()
            for connection in list(self.server.open):
                connection.close()

    def close(self) -> None:
        """Stop serving; put back what the supervisor's process had before."""
        global _active
        if _active is self:
            _active = None
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self.saved is not None:
            from prometheus_client import values

            env, values.ValueClass = self.saved
            if env is None:
                os.environ.pop(metrics.MULTIPROCESS, None)
            else:
                os.environ[metrics.MULTIPROCESS] = env
            metrics.jobs.cache_clear()
            take_slot("")
        if self.made and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.held is not None:
            os.close(self.held)
            self.held = None


def _family(address: str, port: int) -> socket.AddressFamily:
    """IPv4 or IPv6, as the address (a name, maybe) resolves for listening."""
    found = socket.getaddrinfo(
        address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    return found[0][0]


def _serve(registry: Any, address: str, port: int) -> Any:
    """An HTTP server of ``registry`` on a daemon thread, one thread per request, that
    knows the connections it has open (a process forked meanwhile closes its copies)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged."""

    class Server(ThreadingWSGIServer):
        address_family = _family(address, port)
        open: set[Any] = set()

        def process_request(self, request: Any, client_address: Any) -> None:
            self.open.add(request)
            super().process_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            self.open.discard(request)
            super().shutdown_request(request)

    Server.open = set()
    server = make_server(address, port, make_wsgi_app(registry), Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="conveyor-metrics").start()
    return server


class _Processes:
    """The samples every process of the worker wrote, summed."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def describe(self) -> list[Any]:
        return metrics.job_families()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.exporter.directory:
            yield from MultiProcessCollector(None, path=self.exporter.directory).collect()


def _remove_stale(parent: Path) -> None:
    """Remove the sample directories of supervisors that are gone (killed, say): those whose
    lock no process holds any more."""
    for path in parent.glob(f"{PREFIX}*"):
        try:
            if not path.is_dir() or time.time() - path.stat().st_mtime < FRESH:
                continue  # one a supervisor starting now has made, and not locked yet
        except OSError:
            continue
        try:
            held = os.open(path / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a supervisor, or a process of one, uses it
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("Removed the metrics samples of a supervisor that is gone: %s", path)
        finally:
            os.close(held)
