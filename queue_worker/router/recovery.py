"""Recovery, takeover and restoring after a Redis reset: finishing what was left.

* **Recovery** (at start-up, for this worker's previous run): a pull with no
  outcome becomes ``pull.interrupted``; each task it held without a terminal
  event is re-run as its next attempt or failed (``RECOVERY_POLICY``), or left to
  the queue when its lease is gone (``task.recovered``).
* **Takeover** (for a peer whose liveness key is gone, see ``liveness.py``): a
  peer seen dead at two looks is fenced and claimed by one script
  (``worker.fenced``), then recovered the same way.
* **Restoring** (Redis lost data): ``stream.reset``, then the tasks held here
  and the outcomes lost before the queue acknowledged them, re-recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from queue_worker.config import Settings
from queue_worker.router.executors import ExecutorPool
from queue_worker.router.fleet import SharedSlots, claim, dead_workers, fence, release_claim
from queue_worker.router.inflight import InFlight, InFlightRegistry
from queue_worker.router.liveness import Liveness
from queue_worker.router.queue_client import QueueClient, QueueClients, ReportRefused
from queue_worker.streams import events as ev
from queue_worker.streams.entries import parse_entries
from queue_worker.streams.store import RECORDING_ERRORS, EventStore
from queue_worker.streams.views import StatusView

log = structlog.get_logger(__name__)

FOLD_WAIT_S = 5.0  # a takeover waits this long at most for the view to fold the fence


def parse_pulled(raws: list[Any]) -> ev.TaskPulled | ev.TaskRestored | None:
    """The ``task.pulled`` (or ``task.restored``) event in an ``XRANGE id id`` answer."""
    entries = parse_entries(raws)
    if entries and isinstance(entries[0].event, ev.TaskPulled | ev.TaskRestored):
        return entries[0].event
    return None


class Recovery:
    """Recovers this worker's previous run and dead peers; restores after a reset."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        clients: QueueClients,
        inflight: InFlightRegistry,
        pool: ExecutorPool,
        *,
        start: Callable[[InFlight, int], None],
        liveness: Liveness | None = None,
        slots: SharedSlots | None = None,
        folded: Callable[[str, float], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clients = clients
        self.inflight = inflight
        self.pool = pool
        self.start = start  # re-runs a recovered task from the given attempt
        self.liveness = liveness
        self.slots = slots
        self.folded = folded  # waits until the view has folded up to an entry id
        self.paused = False  # stopping, or fenced: no takeover

    async def recover(self, view: StatusView, owner: str | None = None) -> None:
        """Finish what a worker left: open pulls and unfinished tasks.

        ``owner`` is a dead peer being taken over; by default this worker's own
        previous run, unless a peer is taking it over right now.
        """
        me, redis, keys = self.settings.worker_id, self.store.redis, self.store.keys
        if owner is None and not await claim(redis, keys.takeover(me), me):
            log.warning("recovery_left_to_peer", holder="another replica")
            return
        try:
            await self._recover(view, owner or me, taken_from=owner)
        finally:
            if owner is None:
                await release_claim(redis, keys.takeover(me), me)

    async def _recover(self, view: StatusView, owner: str, taken_from: str | None) -> None:
        mine = view.workers.get(owner)
        if mine is not None and mine.open_pull is not None:
            urls = self.settings.queue_urls()
            counts = await asyncio.gather(*(self.clients.get(u).running_count() for u in urls))
            known = [n for n in counts if n is not None]
            running = sum(known) if known else None
            log.warning("pull_interrupted", pull_id=mine.open_pull, queue_running=running)
            await self.store.append(
                ev.PullInterrupted(pull_id=mine.open_pull, queue_running=running, owner=taken_from)
            )
        for eval_id, state in list(view.in_flight.items()):
            if state.worker_id == owner:
                recovered = ev.TaskRecovered(
                    eval_id=eval_id,
                    action="redispatch",
                    stage=state.stage,
                    previous_attempt=state.attempt,
                    owner=taken_from,
                )
                await self._recover_task(state.pulled_id, recovered)

    async def _recover_task(self, pulled_id: str, recovered: ev.TaskRecovered) -> None:
        """Re-run, fail or leave to the queue one task; ``recovered`` says which it was."""
        eval_id, attempt = recovered.eval_id, recovered.previous_attempt
        if eval_id in self.inflight:
            return  # it runs here (a stream reset re-recorded it): nothing to recover
        raws = await self.store.redis.xrange(self.store.keys.events, pulled_id, pulled_id)
        pulled = parse_pulled(raws)
        trace_id = None if pulled is None else pulled.task.trace_id
        recovered = msgspec.structs.replace(recovered, trace_id=trace_id)
        queue = self.clients.get(None if pulled is None else pulled.queue)
        lease_s = None if pulled is None else pulled.lease_s
        if lease_s is not None and not await _holds_lease(queue, eval_id, lease_s):
            log.warning("task_lease_lost", eval_id=eval_id)
            await self.store.append(msgspec.structs.replace(recovered, action="lease_lost"))
            return
        if pulled is None or self.settings.recovery_policy == "fail":
            why = "its task.pulled entry is gone" if pulled is None else "RECOVERY_POLICY=fail"
            await self.store.append(
                msgspec.structs.replace(recovered, action="fail"),
                ev.TaskFailed(
                    eval_id=eval_id,
                    attempt=attempt,
                    reason="worker_stopped",
                    error=f"the worker stopped while the task was {recovered.stage}; "
                    f"not re-run ({why})",
                    queue=None if pulled is None else pulled.queue,
                    trace_id=trace_id,
                ),
            )
            return
        log.info("task_recovered", eval_id=eval_id, stage=recovered.stage, attempt=attempt + 1)
        record = self.inflight.reserve(
            pulled.task, queue.base_url, queue, lease_s=pulled.lease_s, attempt=attempt,
            stage="recovered",
        )  # fmt: skip
        try:
            await self.store.append(recovered)
        except BaseException:
            self.inflight.release(eval_id)
            raise
        self.start(record, attempt + 1)

    # --- takeover ----------------------------------------------------------------------

    async def take_over_dead_peers(self, view: StatusView) -> None:
        """Every ``TAKEOVER_INTERVAL_S``: recover the tasks of peers whose liveness key is
        gone. A peer is taken over only when it was seen dead at two looks at least two
        heartbeats apart while this worker's own heartbeat went through in between (so a
        Redis that stalled or came back empty, and took every key with it, does not make
        live peers look dead); the fence script makes exactly one replica do it and voids
        whatever the peer would still write."""
        me = self.settings.worker_id
        suspects: dict[str, float] = {}  # worker -> monotonic time first seen dead
        confirm_s = 2 * self.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(self.settings.takeover_interval_s)
            if self.paused or (self.liveness is not None and not self.liveness.ok):
                suspects.clear()  # our own view of the fleet is not to be trusted now
                continue
            owners = {t.worker_id for t in view.in_flight.values()}
            owners |= {w for w, v in view.workers.items() if v.open_pull is not None}
            owners.discard(me)
            try:
                dead = await dead_workers(self.store.redis, self.store.keys, sorted(owners))
                now = time.monotonic()
                suspects = {w: suspects.get(w, now) for w in dead}
                for worker, first_seen in suspects.items():
                    beat_since = self.liveness is None or self.liveness.last_ok > first_seen
                    if now - first_seen >= confirm_s and beat_since:
                        await self._take_over(view, worker)
            except RECORDING_ERRORS as exc:
                log.error("takeover_failed", error=str(exc))

    async def _take_over(self, view: StatusView, dead: str) -> None:
        seen = view.workers.get(dead)
        epoch = self.liveness.epoch if self.liveness is not None else None
        won = await fence(
            self.store.redis,
            self.store.keys,
            dead,
            self.settings.worker_id,
            epoch or "",
            seen.generation if seen else 0,
        )
        if won is None:
            return  # alive after all, claimed by another replica, or Redis lost data
        generation, last_id = won
        log.warning("taking_over", worker=dead, generation=generation)
        await self.store.append(ev.WorkerFenced(owner=dead, generation=generation))
        # Entries the peer landed before the fence are folded before deciding anything.
        if self.folded is not None:
            try:
                await self.folded(last_id, FOLD_WAIT_S)
            except TimeoutError:
                log.warning("takeover_view_behind", worker=dead, until=last_id)
        if self.slots is not None:  # its slots need not wait for their expiry
            await self.slots.release_worker([x.url for x in self.pool.executors], dead)
        await self.recover(view, owner=dead)

    # --- a Redis reset ---------------------------------------------------------------

    async def restore(
        self,
        reason: str,
        stream_last_id: str | None,
        published: Callable[[str], bool],
        view: StatusView | None = None,
    ) -> None:
        """Redis lost data (a reset): append ``stream.reset``, then re-record the tasks in
        flight here and the outcomes the queue had not acknowledged whose entries are gone
        (``published`` tells which ones had their message sent before)."""
        if view is not None:
            self.inflight.acknowledged(view)
        tasks = [record.restored() for record in self.inflight]
        kept = self.inflight.kept_outcomes()
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in kept:
                pipe.xrange(self.store.keys.events, entry_id, entry_id)
            found = await pipe.execute() if kept else []
        outcomes = [
            msgspec.structs.replace(o, restored=True, published=published(o.eval_id))
            for (_, o), there in zip(kept, found, strict=True)
            if not there
        ]
        log.warning("stream_reset", reason=reason, tasks=len(tasks), outcomes=len(outcomes))
        await self.store.append(
            ev.StreamReset(
                reason=reason,
                last_seen_id=self.store.last_id,
                stream_last_id=stream_last_id,
                restored_tasks=len(tasks),
                restored_outcomes=len(outcomes),
            ),
            *tasks,
            *outcomes,
        )


async def _holds_lease(queue: QueueClient, eval_id: str, lease_s: float) -> bool:
    """Whether the queue still leases ``eval_id`` to us (renewing it)."""
    try:
        return await queue.renew(eval_id, lease_s)
    except ReportRefused:
        return False
