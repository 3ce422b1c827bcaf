"""Which database servers the tests can reach; under CI=true every one is required."""

from __future__ import annotations

import os
import socket

SERVERS = {"postgres": ("127.0.0.1", 5432), "mysql": ("127.0.0.1", 3306)}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def reachable(name: str) -> bool:
    host, port = SERVERS[name]
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def available() -> dict[str, bool]:
    """Map each server to whether tests should use it (always, under CI)."""
    return {name: in_ci() or reachable(name) for name in SERVERS}
