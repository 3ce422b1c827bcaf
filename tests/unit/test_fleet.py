"""Fleets: processes per queue, shared over machines, and a host's config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import fleet
from conveyor.exceptions import ConveyorImproperlyConfigured
from conveyor.records import Pool, QueueSelector

ALL = QueueSelector()
KNOWN = frozenset({"default", "emails", "reports"})


def test_machines_together_run_exactly_the_configured_counts():
    counts = {"emails": 3, "reports": 1, "default": 2}
    for machines in range(1, 8):
        total: dict[str, int] = {}
        shares = [fleet.share(counts, n, machines) for n in range(1, machines + 1)]
        for mine in shares:
            for queue, count in mine.items():
                total[queue] = total.get(queue, 0) + count
        assert total == counts
        sizes = [sum(mine.values()) for mine in shares]
        assert max(sizes) - min(sizes) <= 1  # as even as whole processes allow


def test_the_documented_split():
    counts = {"emails": 2, "reports": 1}
    assert fleet.share(counts, 1, 2) == {"emails": 1, "reports": 1}
    assert fleet.share(counts, 2, 2) == {"emails": 1}


def test_pools_per_queue_and_for_a_plain_count():
    pools = fleet.pools_for({"emails": 2, "reports": 1}, ALL, KNOWN)
    assert pools == (
        Pool(QueueSelector(include=frozenset({"emails"})), 2),
        Pool(QueueSelector(include=frozenset({"reports"})), 1),
    )
    emails = QueueSelector(include=frozenset({"emails"}))
    assert fleet.pools_for(5, emails, KNOWN, 2, 2) == (Pool(emails, 2),)
    assert fleet.pools_for(5, emails, KNOWN, 1, 2) == (Pool(emails, 3),)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: fleet.pools_for({"nowhere": 1}, ALL, KNOWN), "unknown queue(s) 'nowhere'"),
        (
            lambda: fleet.pools_for({"emails": 1}, QueueSelector(include=frozenset({"a"})), KNOWN),
            "cannot be combined",
        ),
        (lambda: fleet.pools_for(1, ALL, KNOWN, 2, 2), "leave none for machine 2"),
        (lambda: fleet.pools_for({"emails": 1}, ALL, KNOWN, 2, 2), "leave none for machine 2"),
        (lambda: fleet.share({"emails": 1}, 3, 2), "--machine must be from 1 to --of (2)"),
        (lambda: fleet.parse_counts("emails=two"), "dict of queue names"),
        (lambda: fleet.parse_counts("0"), "from 1 to 512"),
        (lambda: fleet.parse_counts("emails=0"), "1 in all at least"),
        (lambda: fleet.counts_of({"emails": True}, "OPTIONS['PROCESSES']"), "PROCESSES"),
    ],
)
def test_bad_counts_are_refused_naming_what_is_wrong(call, words):  # type: ignore[no-untyped-def]
    with pytest.raises(ConveyorImproperlyConfigured) as raised:
        call()
    assert words in str(raised.value)


def test_counts_on_the_command_line():
    assert fleet.parse_counts("4") == 4
    assert fleet.parse_counts("emails=2, reports=1") == {"emails": 2, "reports": 1}


def test_a_host_config_file(tmp_path: Path):
    good = tmp_path / "host.py"
    good.write_text('PROCESSES = {"emails": 2}\nTHREADS = 4\nhelper = 1\n')
    assert fleet.load_host_config(good) == {"PROCESSES": {"emails": 2}, "THREADS": 4}
    bad = tmp_path / "bad.py"
    bad.write_text("PROCESES = 2\n")
    with pytest.raises(ConveyorImproperlyConfigured, match=r"unknown option.*PROCESES"):
        fleet.load_host_config(bad)
    with pytest.raises(ConveyorImproperlyConfigured, match="no such file"):
        fleet.load_host_config(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("PROCESSES = (\n")
    with pytest.raises(ConveyorImproperlyConfigured, match="cannot be read"):
        fleet.load_host_config(broken)
