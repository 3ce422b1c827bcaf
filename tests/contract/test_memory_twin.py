"""The in-process store is the database store's twin: the same verbs give the same results.

A seeded random script of verbs runs against the memory store and SQLite side by side;
after every step both must answer alike and hold jobs that read back alike.
"""

from __future__ import annotations

import random
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.tasks import TaskResultStatus, task_backends
from django.tasks.base import TaskError
from django.utils import timezone

from conveyor.backends.base import StoreBackend
from conveyor.backends.memory import MemoryBackend
from conveyor.records import Job, Outcome, QueueSelector, WorkerInfo
from tests.testapp import tasks

ALL = QueueSelector()
SELECTORS = [
    ALL,
    QueueSelector(include=frozenset({"emails"})),
    QueueSelector(include=frozenset({"emails", "reports"})),
    QueueSelector(exclude=frozenset({"emails"})),
]
BOOM = TaskError(exception_class_path="builtins.ValueError", traceback="ValueError: boom\n")


def _pair() -> tuple[StoreBackend, StoreBackend]:
    options = {"MAX_ATTEMPTS": 2}
    params = {"QUEUES": ["default", "emails", "reports"], "OPTIONS": options}
    database = type(task_backends["default"])("default", params)
    memory = MemoryBackend("memory", params)
    memory.clear()
    assert isinstance(database, StoreBackend)
    return memory, database


class Twins:
    """Runs each verb on both stores; jobs are named by their enqueue order.

    Every time a verb is given (outcomes, retry times, start times) is fixed by the
    script, so both stores hold the same values and only lease times differ.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.stores = _pair()
        self.ids: list[list[str]] = [[], []]
        self.deliveries: list[tuple[Job, Job]] = []
        self.base = timezone.now().replace(microsecond=0)
        self.tick = 0

    def when(self) -> datetime:
        """A new fixed time before the script began."""
        self.tick += 1
        return self.base - timedelta(hours=1) + timedelta(seconds=self.tick)

    def index(self, side: int, job_id: str) -> int:
        return self.ids[side].index(job_id)

    def named(self, side: int, jobs: list[Job]) -> list[Any]:
        return sorted((self.index(side, j.id), j.attempt, j.worker_ids) for j in jobs)

    def both(self, verb: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(store, verb)(*args, **kwargs) for store in self.stores]

    def enqueue(self) -> list[Any]:
        rng = self.rng
        queue = rng.choice(["default", "emails", "reports"])
        later = self.base + timedelta(hours=1)
        run_after = rng.choice([None, None, self.base - timedelta(minutes=1), later])
        priority = rng.choice([-5, 0, 0, 7])
        for side, store in enumerate(self.stores):
            task = tasks.add.using(
                backend=store.alias, queue_name=queue, priority=priority, run_after=run_after
            )
            self.ids[side].append(store.enqueue(task, [len(self.ids[side]), 1], {}).id)
        return [None, None]

    def claim(self) -> list[Any]:
        worker = self.rng.choice(["w1", "w2", "w3"])
        selector, limit = self.rng.choice(SELECTORS), self.rng.randint(1, 3)
        got = self.both("claim", worker, selector, limit)
        self.deliveries += zip(*got, strict=True)
        return [
            [(self.index(side, j.id), j.attempt, j.worker_ids) for j in jobs]
            for side, jobs in enumerate(got)
        ]

    def on_delivery(self) -> list[Any]:
        if not self.deliveries:
            return [None, None]
        pair = self.rng.choice(self.deliveries)
        verb = self.rng.choice(["complete", "fail", "retry", "retry", "unclaim", "requeue", "beat"])
        started, finished = self.when(), self.when()
        retry_at = self.rng.choice([self.when(), self.base + timedelta(hours=1)])
        counts, began = self.rng.random() < 0.8, self.rng.choice([None, started])
        answers = []
        for store, job in zip(self.stores, pair, strict=True):
            value = Outcome(started_at=started, finished_at=finished, return_value=[job.args[0]])
            failure = replace(value, return_value=None, error=BOOM)
            if verb == "complete":
                answers.append(bool(store.complete([(job, value)])))
            elif verb == "fail":
                answers.append(store.fail(job, failure))
            elif verb == "retry":
                answers.append(store.retry(job, replace(failure, retry_at=retry_at)))
            elif verb == "unclaim":
                answers.append(store.unclaim([job]))
            elif verb == "requeue":
                answers.append(store.requeue(job, "lost", counts_as_attempt=counts))
            else:
                held = [(job.key, job.delivery, began)]
                answers.append(store.heartbeat([job.worker_ids[-1]], held))
        return answers

    def release(self) -> list[Any]:
        worker = self.rng.choice(["w1", "w2", "w3"])
        executing = [self.rng.random() < 0.5 for _ in self.deliveries]
        counts = self.rng.random() < 0.8
        answers = []
        for side, store in enumerate(self.stores):
            running = {
                (pair[side].key, pair[side].delivery)
                for pair, chosen in zip(self.deliveries, executing, strict=True)
                if chosen
            }
            put_back = store.release(worker, "died", executing=running, counts_as_attempt=counts)
            answers.append(
                sorted((self.index(side, p.job.id), p.counted, p.failed) for p in put_back)
            )
        return answers

    def other(self) -> list[Any]:
        verb = self.rng.choice(["cancel", "stage", "reclaim"])
        if verb == "cancel" and self.ids[0]:
            i = self.rng.randrange(len(self.ids[0]))
            return [store.cancel(self.ids[side][i]) for side, store in enumerate(self.stores)]
        if verb == "reclaim":  # no lease has run out: nothing is given back
            return [
                self.named(side, jobs)
                for side, jobs in enumerate(self.both("reclaim", ["w1", "w2"]))
            ]
        return self.both("stage")

    def snapshot(self, side: int) -> Any:
        store = self.stores[side]
        jobs = []
        for job_id in self.ids[side]:
            r = store.get_result(job_id)
            value = r.return_value if r.status == TaskResultStatus.SUCCESSFUL else None
            errors = [(e.exception_class_path, e.traceback) for e in r.errors]
            finished = r.finished_at if r.status == TaskResultStatus.SUCCESSFUL else None
            times = (r.started_at, r.last_attempted_at, finished, r.finished_at is None)
            jobs.append((r.status, r.attempts, r.worker_ids, errors, value, times, r.args))
        stats = store.stats()
        counts = (stats.ready, stats.scheduled, stats.running, stats.successful, stats.failed)
        return jobs, counts, store.next_due(ALL)


@pytest.mark.django_db(databases=["default"], transaction=True)
@pytest.mark.parametrize("seed", range(12))
def test_memory_and_database_stores_agree(seed):
    twins = Twins(seed)
    actions = [twins.enqueue, twins.claim, twins.claim, twins.on_delivery, twins.on_delivery]
    for step in range(120):
        action = twins.rng.choice([*actions, twins.on_delivery, twins.release, twins.other])
        mine, theirs = action()
        assert mine == theirs, (step, action.__name__)
        mine, theirs = twins.snapshot(0), twins.snapshot(1)
        assert mine[1] == theirs[1], (step, action.__name__)
        # A retry falls due its delay after now on each store's own clock: not to the
        # microsecond alike.
        due, other_due = mine[2], theirs[2]
        assert (due is None) == (other_due is None), (step, action.__name__)
        if due is not None:
            assert abs(due - other_due) < timedelta(seconds=1), (step, action.__name__)
        for i, (a, b) in enumerate(zip(mine[0], theirs[0], strict=True)):
            assert a == b, (step, action.__name__, i)


def test_every_thread_sees_the_same_jobs():
    memory = task_backends["memory"]
    memory.clear()  # type: ignore[attr-defined]
    result = tasks.add.using(backend="memory").enqueue(1, 2)
    seen: list[Any] = []
    thread = threading.Thread(
        target=lambda: seen.append(task_backends["memory"].get_result(result.id))
    )
    thread.start()
    thread.join()
    assert task_backends["memory"] is memory and seen[0].id == result.id
    memory.clear()  # type: ignore[attr-defined]


def test_a_delivery_owns_copies_of_its_arguments():
    memory = MemoryBackend("memory", {"QUEUES": ["default"]})
    memory.clear()
    result = memory.enqueue(tasks.add, [[1, 2], {"a": 1}], {})
    [job] = memory.claim("w", ALL, 1)
    job.args[0].append(3)
    job.args[1]["a"] = 2
    assert memory.get_result(result.id).args == [[1, 2], {"a": 1}]
    value = {"n": [1]}
    now = timezone.now()
    memory.complete([(job, Outcome(started_at=now, finished_at=now, return_value=value))])
    value["n"].append(2)
    assert memory.get_result(result.id).return_value == {"n": [1]}
    memory.clear()


def test_a_worker_id_registers_once():
    memory = MemoryBackend("memory", {})
    memory.clear()
    info = WorkerInfo(id="w", backend="memory", kind="process", host="h", pid=1)
    memory.register_worker(info)
    with pytest.raises(ValueError, match="already registered"):
        memory.register_worker(info)
    memory.after_fork()  # a fresh lock; the data stays
    assert [w.id for w in memory.workers()] == ["w"]
    memory.clear()
