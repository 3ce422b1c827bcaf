"""Start, watch, measure and stop real worker processes (no Django import here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
MANAGE = BENCH_DIR / "manage.py"
SYSTEMS = ("conveyor", "tasksdb")
LABELS = {"conveyor": "Conveyor", "tasksdb": "django-tasks-db"}
STOP_GRACE = 15.0  # seconds a worker gets to exit after SIGTERM before SIGKILL
MIB = 1024 * 1024


def worker_commands(system: str, processes: int, until_done: bool) -> list[list[str]]:
    """The command lines that run ``processes`` workers of ``system`` on its own backend."""
    manage = [sys.executable, str(MANAGE)]
    if system == "conveyor":
        argv = [
            *manage,
            "conveyor",
            "worker",
            "--backend",
            "conveyor",
            "--processes",
            str(processes),
        ]
        return [[*argv, "--until-done"] if until_done else argv]
    if system == "tasksdb":
        # Its defaults otherwise (interval 1s, startup delay); it is stopped with SIGTERM.
        return [[*manage, "db_worker", "--backend", "tasksdb"] for _ in range(processes)]
    raise ValueError(f"unknown system {system!r}")


def describe_commands(system: str, processes: int, until_done: bool) -> str:
    """The worker command lines, as a person would type them."""
    commands = worker_commands(system, processes, until_done)
    shown = {" ".join(["manage.py", *argv[2:]]) for argv in commands}
    prefix = f"{len(commands)} x " if len(commands) > 1 else ""
    return prefix + " ".join(sorted(shown))


def _kill_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


class WorkerGroup:
    """Worker processes, each the leader of its own process group; all stopped on exit.

    Every started pid is also appended to ``pidfile`` so that the orchestrator can kill
    what a crashed client left behind.
    """

    def __init__(
        self, logdir: Path, label: str, *, supervised: bool, pidfile: Path | None = None
    ) -> None:
        self.logdir = logdir
        self.label = label
        self.supervised = supervised  # the started process only supervises its children
        self.pidfile = pidfile
        self.popens: list[subprocess.Popen[bytes]] = []
        self.started_at: float | None = None
        self.logs: list[Path] = []

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, commands: list[list[str]], env: dict[str, str] | None = None) -> None:
        """Start every command (in ``env``, or this process's environment); the clock of
        ``started_at`` begins before the first."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        for argv in commands:
            log = self.logdir / f"{self.label}-{len(self.popens) + 1}.log"
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.popens.append(popen)
            self.logs.append(log)
            self._record(popen.pid)

    def _record(self, pid: int) -> None:
        if self.pidfile is not None:
            with self.pidfile.open("a") as f:
                f.write(f"{pid}\n")

    def alive(self) -> bool:
        """Say whether any started process is still running."""
        return any(p.poll() is None for p in self.popens)

    def wait_exit(self, timeout: float) -> float | None:
        """Wait for every process to exit; return when (monotonic), or None on time-out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return time.monotonic()
            time.sleep(0.01)
        return None

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.popens]

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every group, then SIGKILL what is still there after ``grace``."""
        running = [p for p in self.popens if p.poll() is None]
        for popen in running:
            _kill_group(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for popen in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for popen in self.popens:
            # Kill the whole group even when its leader exited: no orphaned children.
            _kill_group(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)

    def processes(self) -> list[Process]:
        """Every live worker process: each started process and its descendants."""
        found: list[Process] = []
        for popen in self.popens:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(popen.pid)
                found.append(Process(root, "supervisor" if self.supervised else "worker"))
                found.extend(Process(child, "worker") for child in root.children(recursive=True))
        return found


@dataclass(frozen=True, slots=True)
class Process:
    """A live worker-side process and its role: ``supervisor`` or ``worker``."""

    handle: psutil.Process
    role: str


def idle_cpu_percent(processes: list[Process], seconds: float) -> float:
    """CPU used by ``processes`` over ``seconds``, in % of one core (user + system)."""
    before = {p.handle.pid: _cpu_seconds(p.handle) for p in processes}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    used = 0.0
    for p in processes:
        after = _cpu_seconds(p.handle)
        if after is not None and before[p.handle.pid] is not None:
            used += after - before[p.handle.pid]  # type: ignore[operator]
    return 100.0 * used / elapsed


def _cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return None
    return float(times.user + times.system)


def memory(processes: list[Process]) -> list[dict[str, float | str]]:
    """RSS, USS and PSS of each process, in MiB."""
    found: list[dict[str, float | str]] = []
    for p in processes:
        try:
            info = p.handle.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        found.append(
            {
                "role": p.role,
                "pid": p.handle.pid,
                "rss": info.rss / MIB,
                "uss": info.uss / MIB,
                "pss": getattr(info, "pss", 0.0) / MIB,
            }
        )
    return found


def kill_leftovers(pidfile: Path) -> int:
    """SIGKILL every bench worker still in a process group listed in ``pidfile``.

    A group outlives its leader, so its members are looked for one by one; the command
    line check makes sure a reused id is never hit.
    """
    if not pidfile.exists():
        return 0
    groups = {int(line) for line in pidfile.read_text().split()}
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) in groups and str(MANAGE) in (proc.info["cmdline"] or []):
                proc.kill()
                killed += 1
    return killed
