"""Helpers for tests: tasks bound to a backend, jobs by id, real worker subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def lines(path: Path) -> list[str]:
    """The lines a ``log_line`` task wrote."""
    return path.read_text().splitlines() if path.exists() else []
