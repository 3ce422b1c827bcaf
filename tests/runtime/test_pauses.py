"""What a worker process knows of paused queues, and how often it reads them."""

from __future__ import annotations

from conveyor import queues
from conveyor.records import QueueSelector
from conveyor.runtime.pauses import Pauses

DEFAULT = QueueSelector(include=frozenset({"default"}))


def counted(backend, monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    reads = [0]
    read = backend.paused_queues

    def paused_queues():  # type: ignore[no-untyped-def]
        reads[0] += 1
        return read()

    monkeypatch.setattr(backend, "paused_queues", paused_queues)
    return reads


def test_a_pause_of_a_queue_not_served_costs_no_read_per_claim(backend, backend_alias, monkeypatch):
    queues.pause("emails", backend=backend_alias)
    reads = counted(backend, monkeypatch)
    pauses = Pauses(backend, DEFAULT)
    for _ in range(10):
        assert pauses.serving(idle=True) == DEFAULT
    assert reads[0] == 1  # the first look; then once a second, as with no pause at all


def test_an_idle_process_reads_again_while_a_queue_it_serves_is_paused(
    backend, backend_alias, monkeypatch
):
    queues.pause("default", backend=backend_alias)
    reads = counted(backend, monkeypatch)
    pauses = Pauses(backend, DEFAULT)
    assert "default" in pauses.serving(idle=True).exclude
    queues.resume("default", backend=backend_alias)
    assert pauses.serving(idle=True) == DEFAULT  # woken by the resume: seen at once
    assert pauses.serving(idle=False) == DEFAULT
    assert reads[0] == 2
