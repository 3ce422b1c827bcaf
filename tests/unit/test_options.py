"""Backend options are checked strictly when a backend is built, naming the bad one."""

from __future__ import annotations

import math
from typing import Any

import pytest

from conveyor.backends.database import DatabaseBackend
from conveyor.conf import BackendOptions
from conveyor.exceptions import ConveyorImproperlyConfigured

NUMBERS = [
    "LEASE",
    "POLL_INTERVAL",
    "MAX_ATTEMPTS",
    "BATCH_SIZE",
    "MAX_PAYLOAD",
    "RETRIES",
    "RETRY_BACKOFF",
    "RETRY_BACKOFF_MAX",
    "CANCEL_GRACE",
]
WHOLE = {"MAX_ATTEMPTS", "BATCH_SIZE", "MAX_PAYLOAD", "RETRIES"}
NOT_NUMBERS = [math.nan, math.inf, -math.inf, 1e12, 10**400, "5", "", True, False, None, [5], {}]


def build(options: dict[str, Any]) -> DatabaseBackend:
    return DatabaseBackend("jobs", {"OPTIONS": options})


@pytest.mark.parametrize("name", NUMBERS)
@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_numbers_that_are_not_finite_numbers_are_refused_by_name(name, value):
    with pytest.raises(ConveyorImproperlyConfigured) as info:
        build({name: value})
    message = str(info.value)
    assert f"TASKS['jobs']['OPTIONS']['{name}']" in message
    assert "must be a" in message and "not " in message


@pytest.mark.parametrize("name", NUMBERS)
def test_each_number_has_a_range(name):
    low, high = BackendOptions.ranges[name.lower()]
    for value in (low, high, (low + high) // 2):
        build({name: int(value) if name in WHOLE else value})
    below = low - 1 if name in WHOLE else (low / 2 if low > 0 else -0.5)
    above = high + 1 if name in WHOLE else high * 2
    for value in (below, above, -1) + ((0,) if low > 0 else ()):
        with pytest.raises(ConveyorImproperlyConfigured, match=rf"'{name}'.* from .* to "):
            build({name: int(value) if name in WHOLE else value})


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_counts_must_be_whole_numbers(name):
    with pytest.raises(ConveyorImproperlyConfigured, match=rf"'{name}'.*a whole number"):
        build({name: 16.0})
    with pytest.raises(ConveyorImproperlyConfigured, match=rf"'{name}'.*a whole number"):
        build({name: 16.5})


def test_seconds_may_be_whole_or_fractional():
    backend = build({"LEASE": 45, "POLL_INTERVAL": 0.25})
    assert backend.conveyor_options.lease == 45
    assert backend.conveyor_options.poll_interval == 0.25


def test_the_message_shows_the_range_readably():
    with pytest.raises(ConveyorImproperlyConfigured) as info:
        build({"MAX_PAYLOAD": 1})
    assert "from 1024 to 67108864, not 1." in str(info.value)
    with pytest.raises(ConveyorImproperlyConfigured) as info:
        build({"LEASE": math.nan})
    assert "must be a number from 0.1 to 86400, not nan." in str(info.value)


def test_defaults_are_valid_and_max_payload_is_one_mib():
    options = build({}).conveyor_options
    assert options.max_payload == 1024 * 1024
    assert (options.lease, options.poll_interval) == (30.0, 0.5)
    assert (options.max_attempts, options.batch_size) == (5, 16)


@pytest.mark.parametrize("value", [5, "", None, b"default", ["default"]], ids=repr)
def test_database_must_be_an_alias(value):
    with pytest.raises(ConveyorImproperlyConfigured, match=r"'DATABASE'.*non-empty string"):
        build({"DATABASE": value})


def test_unknown_options_are_named():
    with pytest.raises(ConveyorImproperlyConfigured, match=r"unknown option.*MAX_PAYLAOD"):
        build({"MAX_PAYLAOD": 2048})
    with pytest.raises(ConveyorImproperlyConfigured, match=r"unknown option.*lease"):
        build({"lease": 3})  # option names are upper case, as Django's are


def test_the_options_object_checks_itself():
    with pytest.raises(ConveyorImproperlyConfigured, match="'BATCH_SIZE'"):
        BackendOptions.from_settings("x", {"BATCH_SIZE": math.inf})
    with pytest.raises(ConveyorImproperlyConfigured, match="'LEASE'"):
        BackendOptions(lease=math.nan).validate("x")


@pytest.mark.parametrize("value", ["yes", 1, None], ids=repr)
def test_switches_must_be_true_or_false(value):
    with pytest.raises(ConveyorImproperlyConfigured, match=r"'RETRY_JITTER'.*True or False"):
        build({"RETRY_JITTER": value})
    assert build({"RETRY_JITTER": False}).retry_defaults.jitter is False


@pytest.mark.parametrize("name", ["TIMEOUT", "SOFT_TIMEOUT"])
def test_time_limits_are_none_or_a_positive_number(name):
    assert getattr(build({name: None}).conveyor_options, name.lower()) is None
    assert getattr(build({name: 2.5}).conveyor_options, name.lower()) == 2.5
    for value in (0, -1, math.nan, "5", True, 8 * 86400):
        with pytest.raises(ConveyorImproperlyConfigured, match=rf"'{name}'.*must be a number"):
            build({name: value})


def test_a_soft_limit_must_come_before_the_hard_one():
    with pytest.raises(ConveyorImproperlyConfigured, match=r"'SOFT_TIMEOUT'.*shorter than"):
        build({"TIMEOUT": 5, "SOFT_TIMEOUT": 5})
    backend = build({"TIMEOUT": 5})
    from django.tasks import task

    from conveyor.exceptions import InvalidTaskOption

    warned = task(soft_timeout=10)(module_level)
    with pytest.raises(InvalidTaskOption, match=r"soft_timeout \(10s\) must be shorter"):
        backend.validate_task(warned)
    backend.validate_task(warned.using(timeout=20))  # its own hard limit is longer


def module_level(x: int) -> int:
    return x
