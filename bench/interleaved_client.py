"""A client of ``python -m bench interleaved``: one sample each time a line comes in.

``python -m bench.interleaved_client conveyor|huey``: reads a sample number per line from
standard input and writes that sample's figures (seconds) as one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.e2e_client import POLL

Sample = dict[str, float]


def conveyor() -> Callable[[int], Sample]:
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    from bench.app.tasks import noop_conveyor

    def sample(i: int) -> Sample:
        wall0, t0 = time.time(), time.perf_counter()
        result = noop_conveyor.enqueue(i)
        enqueued = time.perf_counter()
        polls = 0
        while True:
            began = time.perf_counter()
            result.refresh()
            polls += 1
            if result.is_finished:
                break
            time.sleep(POLL)
        assert result.started_at is not None
        return figures(t0, enqueued, began, polls, result.started_at.timestamp() - wall0)

    return sample


def huey() -> Callable[[int], Sample]:
    from bench.huey_app import huey, noop

    huey.flush()

    def sample(i: int) -> Sample:
        wall0, t0 = time.time(), time.perf_counter()
        handle = noop(i)
        enqueued = time.perf_counter()
        polls = 0
        while True:
            began = time.perf_counter()
            started: Any = huey.result(handle.id, preserve=True)
            polls += 1
            if started is not None:
                break
            time.sleep(POLL)
        return figures(t0, enqueued, began, polls, started - wall0)

    return sample


def figures(t0: float, enqueued: float, began: float, polls: int, pickup: float) -> Sample:
    done = time.perf_counter()
    return {
        "wall": done - t0,
        "enqueue": enqueued - t0,
        "poll": done - began,
        "polls": polls,
        "pickup": pickup,
    }


def main() -> int:
    sample = conveyor() if sys.argv[1] == "conveyor" else huey()
    for line in sys.stdin:
        print(json.dumps(sample(int(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
