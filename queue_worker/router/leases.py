"""Keeping the queue's leases of the tasks this worker holds.

Each lease is renewed at a third of its length (``POST /tasks/{id}/renew``),
not while the worker is fenced (a peer may be about to own its tasks). A
renewal answered ``404`` means the lease ran out while the task still runs
here: it is recorded (``task.lease_lost``) and not renewed again; the queue may
hand the task out again, and that second pull is recorded as a duplicate
handout, not run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from queue_worker.router.inflight import InFlightRegistry
from queue_worker.streams import events as ev
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

MIN_PERIOD_S = 0.05


async def keep_leases(
    inflight: InFlightRegistry,
    store: EventStore,
    *,
    may_act: Callable[[], bool],
    default_lease_s: float,
) -> None:
    """Renew every lease held, forever (a supervised loop)."""
    while True:
        leased = inflight.leased()
        shortest = min((t.lease_s or 0 for t in leased), default=0) or default_lease_s
        await asyncio.sleep(max(shortest / 3, MIN_PERIOD_S))
        if not may_act():
            continue
        leased = inflight.leased()
        results = await asyncio.gather(
            *(t.client.renew(t.task.eval_id, t.lease_s or 0) for t in leased),
            return_exceptions=True,
        )
        for record, held in zip(leased, results, strict=True):
            eval_id = record.task.eval_id
            if held is False and inflight.get(eval_id) is record:
                log.warning("task_lease_lost", eval_id=eval_id, queue=record.queue_url)
                record.lease_s = None
                await store.append(ev.TaskLeaseLost(eval_id=eval_id, queue=record.queue_url))
            elif isinstance(held, BaseException):
                log.warning("lease_renewal_failed", eval_id=eval_id, error=str(held))
