#!/usr/bin/env python
"""The manage.py of the benchmark project: workers are started through it.

Conveyor is imported from ``BENCH_CONVEYOR_SRC`` when set (``python -m bench
--conveyor-ref``), else from this checkout's ``src/``.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(root), os.environ.get("BENCH_CONVEYOR_SRC") or str(root / "src")]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
