"""Helpers for tests: tasks bound to a backend, jobs by id, real worker subprocesses."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import connections
from django.tasks import Task, task_backends

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "tests" / "manage.py"
FAST = {"LEASE": 1.0, "POLL_INTERVAL": 0.05}


def on(task: Task, alias: str, **changes: Any) -> Task:
    """The same task, sent to backend ``alias``."""
    return task.using(backend=alias, **changes)


def job(result: Any) -> Any:
    """A ``TaskResult`` read afresh from its backend."""
    return task_backends[result.backend].get_result(result.id)


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, every: float = 0.02) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def subprocess_env(
    options: dict[str, Any] | None = None, names: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a ``manage.py`` subprocess that uses the test databases.

    ``options`` are added to every backend's ``OPTIONS`` (with short leases and polls);
    ``names`` replace the names of some databases.
    """
    env = dict(os.environ)
    env["CONVEYOR_TEST_DB_NAMES"] = json.dumps(
        {alias: connections[alias].settings_dict["NAME"] for alias in connections} | (names or {})
    )
    env["CONVEYOR_TEST_OPTIONS"] = json.dumps({**FAST, **(options or {})})
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


class Worker:
    """``manage.py conveyor worker`` in a subprocess, against the test databases."""

    def __init__(
        self,
        backend: str,
        *args: str,
        options: dict[str, Any] | None = None,
        names: dict[str, str] | None = None,
    ) -> None:
        env = subprocess_env(options, names)
        self.args = [sys.executable, str(MANAGE), "conveyor", "worker", "--backend", backend, *args]
        self.env, self.cwd = env, ROOT
        self.proc = subprocess.Popen(
            self.args,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group, so a test can end it whole
        )
        self.output = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the supervisor and all its children at once: a machine vanishing."""
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.output}") from e
        self.output += out or ""
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            out, _ = self.proc.communicate()
            self.output += out or ""

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What a terminal does not show: control sequences (CSI, OSC) and other escapes.
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: cursor moves, colours, modes
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: titles, links
    r"|\x1b[()][0-9A-Za-z]|\x1b[=>78]"  # character sets, keypad modes, cursor saves
)
HOME = "\x1b[H"  # where each full-screen frame starts
# Every control sequence but those that set colours and styles (SGR, ending in "m").
NOT_STYLES = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]|\x1b[()][A-Z0-9]|\x1b[=>]|\r")


class Terminal:
    """``manage.py`` in a pseudo-terminal of its own, as a person runs it at a shell."""

    def __init__(self, *args: str, columns: int = 200, rows: int = 60) -> None:
        primary, secondary = os.openpty()
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = subprocess_env()
        env.update(TERM="xterm-256color", COLUMNS=str(columns), LINES=str(rows))
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(MANAGE), *args],
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            # The terminal becomes the session's own, so that Ctrl-C typed there reaches it.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(secondary)
        self.primary = primary
        self.received = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.primary, 65536)
            except OSError:  # the other end closed: the program ended
                return
            if not chunk:
                return
            with self.lock:
                self.received += chunk

    @property
    def output(self) -> str:
        """Everything the program wrote, escapes and all."""
        with self.lock:
            return self.received.decode("utf-8", "replace")

    def screen(self) -> str:
        """The text of the last full frame drawn, without its control sequences."""
        text = self.output
        return ESCAPES.sub("", text[text.rfind(HOME) :] if HOME in text else text)

    def frame(self) -> str:
        """The last full frame drawn, with its colours and styles (for a screenshot)."""
        text = self.output
        return NOT_STYLES.sub("", text[text.rfind(HOME) :] if HOME in text else text)

    def type(self, keys: bytes) -> None:
        os.write(self.primary, keys)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise AssertionError(f"still running after {timeout}s:\n{self.screen()}") from e
        self.reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        os.close(self.primary)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None or self.reader.is_alive():
            self.stop()
        else:
            os.close(self.primary)


def lines(path: Path) -> list[str]:
    """The lines a ``log_line`` task wrote."""
    return path.read_text().splitlines() if path.exists() else []
