"""Obeying the operators' actions, as the stream records them.

The status view folds ``control.paused`` / ``control.resumed`` (for the fleet, or one
worker) and ``executor.drained`` / ``executor.undrained``; this module reads that fold:
:func:`pause_of` says whether this worker may pull, and :func:`apply_drains` marks the
pool's executors drained (no new task goes to one; its tasks in flight finish), waking
the tasks that wait for a slot when it changes. It also folds ``task.cancel_requested``
for the tasks in flight: :func:`cancels_for` names those this worker holds, which it
cancels (the request may have reached any replica). And an executor's ``Retry-After``
binds the fleet: :func:`apply_cooldowns` cools down here an executor that answered a
peer 429 or 503 (``executor.throttled``, folded as the executor's
``cooling_until_ts``). The router looks every ``CONTROL_POLL_S``, so every replica
obeys within a second of the entry, and a restart obeys it again from the replay.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from queue_worker.router.executors import THROTTLE_MAX_S, ExecutorPool
from queue_worker.router.inflight import InFlightRegistry
from queue_worker.streams.views import PauseView, StatusView

CONTROL_POLL_S = 0.1


def pause_of(view: StatusView | None, worker_id: str) -> PauseView | None:
    """The pause that stops ``worker_id`` pulling (its own before the fleet's), if any."""
    if view is None:
        return None
    return view.paused.get(worker_id) or view.paused.get("fleet")


def apply_drains(view: StatusView | None, pool: ExecutorPool) -> bool:
    """Mark the pool's executors drained as the view says; whether anything changed."""
    drained = set() if view is None else set(view.drained)
    changed = False
    for x in pool.executors:
        if x.drained != (x.url in drained):
            x.drained = x.url in drained
            changed = True
    return changed


def apply_cooldowns(view: StatusView | None, pool: ExecutorPool) -> None:
    """Cool down the pool's executors that the stream says are cooling down, whichever
    replica they answered: until the entry's time plus its cool-down (the clocks of the
    replicas and of Redis agree to well under a cool-down; never more than
    ``THROTTLE_MAX_S`` from now). A cool-down already longer here is kept."""
    if view is None:
        return
    wall, now = time.time(), time.monotonic()
    for x in pool.executors:
        seen = view.executors.get(x.url)
        if seen is None or not seen.cooling_until_ts:
            continue
        left = min(seen.cooling_until_ts / 1000 - wall, THROTTLE_MAX_S)
        if left > 0:
            x.cooled_until = max(x.cooled_until, now + left)


def cancels_for(view: StatusView | None, held: InFlightRegistry) -> Iterator[tuple[str, str, str]]:
    """(eval_id, by, reason) of each cancel asked for a task held here, not yet acted on."""
    if view is None or not view.cancels:
        return
    for eval_id, asked in list(view.cancels.items()):
        record = held.get(eval_id)
        if record is not None and record.cancel is None and not record.finishing:
            yield eval_id, asked.by, asked.reason
