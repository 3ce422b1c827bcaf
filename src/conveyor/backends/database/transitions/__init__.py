"""Every state change of a job, each written once, for every engine.

A transition is one short transaction (mostly one statement) built from the pieces the
engine's dialect supplies. Writes about a delivery name its token and are refused once the
job has been delivered again. Lease times use the store's clock (``dialect.now()``), never
the caller's.

``dispatch`` gets jobs to workers (insert, insert_one, stage, claim, next_due, run_now);
``outcomes`` ends them (complete, fail, retry, cancel) and notes what a running one is told
or tells (its cancel request, its progress); ``leases`` renews, gives back and recovers
deliveries (heartbeat, unclaim, requeue, release, give_back, reclaim, recover).
``retention`` sets when a finished job may be deleted, and lets go of a ``keep_last``
task's older successes.
"""

from conveyor.backends.database.transitions.dispatch import (
    claim,
    insert,
    insert_one,
    next_due,
    run_now,
    stage,
)
from conveyor.backends.database.transitions.leases import (
    give_back,
    heartbeat,
    reclaim,
    recover,
    release,
    requeue,
    unclaim,
)
from conveyor.backends.database.transitions.outcomes import (
    cancel,
    cancels,
    complete,
    done_channel,
    fail,
    report_progress,
    request_cancel,
    retry,
)

__all__ = [
    "cancel",
    "cancels",
    "claim",
    "complete",
    "done_channel",
    "fail",
    "give_back",
    "heartbeat",
    "insert",
    "insert_one",
    "next_due",
    "reclaim",
    "recover",
    "release",
    "report_progress",
    "request_cancel",
    "requeue",
    "retry",
    "run_now",
    "stage",
    "unclaim",
]
