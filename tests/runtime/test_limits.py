"""Soft time limits raise inside the run they guard, and never after it."""

from __future__ import annotations

import threading
import time

import pytest

from conveyor.exceptions import SoftTimeLimitExceeded
from conveyor.runtime.limits import SoftLimit


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def runs_near_the_limit(rounds: int, escaped: list[BaseException], warned: list[int]) -> None:
    for n in range(rounds):
        try:
            try:
                with SoftLimit(0.002):
                    # Ends before or after the limit (a thread is warned up to one GIL
                    # switch interval, 5 ms, late).
                    busy(0.001 + (n % 10) * 0.001)
            except SoftTimeLimitExceeded:
                warned.append(n)
            busy(0.012)  # well past the limit: a late raise would land here
        except BaseException as e:  # what escaped the guarded run
            escaped.append(e)


def test_on_a_thread_the_limit_never_lands_outside_the_run():
    escaped: list[BaseException] = []
    warned: list[int] = []
    thread = threading.Thread(target=runs_near_the_limit, args=(150, escaped, warned))
    thread.start()
    thread.join()
    assert escaped == []
    assert warned  # some rounds did run into the limit


def test_on_the_main_thread_a_sleep_is_interrupted():
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded, match=r"soft time limit of 0\.05s"), SoftLimit(0.05):
        time.sleep(5)
    assert time.monotonic() - started < 1
    escaped: list[BaseException] = []
    warned: list[int] = []
    runs_near_the_limit(150, escaped, warned)
    assert escaped == [] and warned


def test_no_limit_arms_nothing():
    with SoftLimit(None):
        time.sleep(0.01)
