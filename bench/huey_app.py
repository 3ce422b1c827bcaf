"""The Huey side of ``python -m bench latency``: a ``RedisHuey`` and a no-op task.

The consumer runs as ``python -m huey.bin.huey_consumer bench.huey_app.huey -w 2 -k
process``. Huey stores no start time, so the task returns when it started (``time.time()``);
that also makes its result never ``None``, which ``huey.result()`` returns while waiting.
"""

import os
import time

from huey import RedisHuey

NAME = "conveyor-bench-latency"  # the Redis keys of this run: huey.* with this name

huey = RedisHuey(NAME, url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@huey.task()
def noop(i: int) -> float:
    """Do nothing but say when it started: the benchmark measures the queue."""
    return time.time()
