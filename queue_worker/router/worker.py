"""The router: the write side. It pulls, chooses, dispatches and appends.

It never publishes, reports or touches a view itself: every decision and
every answer from the queue or an executor becomes an event in the stream,
appended before the next step that depends on it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
import structlog

from queue_worker import __version__
from queue_worker.config import Settings
from queue_worker.errors import QueueWorkerError
from queue_worker.router.balancer import make_balancer
from queue_worker.router.discovery import DiscoveryError, Resolver, StaticDiscovery, discovery_for
from queue_worker.router.dispatch import Executed, ExecutionFailed, execute
from queue_worker.router.executors import ExecutorPool, ExecutorState
from queue_worker.router.fleet import SharedSlots, claim, dead_workers, release_claim
from queue_worker.router.queue_client import (
    InvalidTask,
    QueueClient,
    QueueUnavailable,
    ReportRefused,
    parse_task,
)
from queue_worker.streams import events as ev
from queue_worker.streams.store import EventStore, parse_entries
from queue_worker.streams.views import StatusView

log = structlog.get_logger(__name__)

NO_HEALTHY_EXECUTOR = "no_healthy_executor"
# What may go wrong while recording: Redis itself, or the store giving up (stopped, buffer full).
RECORDING_ERRORS = (aioredis.RedisError, OSError, QueueWorkerError)
RESULT_TTL_S = 7 * 24 * 3600
STOP_RECORD_TIMEOUT_S = 5.0
SLOT_POLL_S = 0.02  # with shared slots, how soon a replica looks again for a free one
SLOT_SLACK_S = 30.0  # a slot outlives its dispatch's HTTP timeout by this much
EJECT_REASON_BYTES = 200


def queue_backoff_s(consecutive_errors: int, step_s: float, max_s: float) -> float:
    """The seed's backoff: step, 2*step, 3*step ... capped at ``max_s``."""
    return round(min(step_s * consecutive_errors, max_s), 3)


def retry_delay_ms(attempt: int, base_ms: int, max_ms: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter before attempt ``attempt + 1``."""
    return round(rng.uniform(0, min(max_ms, base_ms * 2 ** (attempt - 1))), 1)


def cap_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to ``max_bytes`` of UTF-8 (on a character boundary), and whether it was."""
    if len(text) * 4 <= max_bytes:
        return text, False
    data = text.encode()
    if len(data) <= max_bytes:
        return text, False
    return data[:max_bytes].decode(errors="ignore"), True


def cap_result(result: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], bool]:
    """The result with its ``output`` and ``error`` strings cut to ``max_bytes`` each."""
    capped, cut = dict(result), False
    for field in ("output", "error"):
        value = capped.get(field)
        if isinstance(value, str):
            capped[field], was_cut = cap_text(value, max_bytes)
            cut = cut or was_cut
    return capped, cut


@dataclass(slots=True)
class QueueSource:
    """One queue the router pulls from, with its own backoff and idle time."""

    url: str
    client: QueueClient
    weight: float = 1.0
    errors: int = 0  # consecutive failed polls
    retry_at: float = 0.0  # monotonic: polled again from then on (after errors)
    idle_until: float = 0.0  # monotonic: it was empty; polled again from then on
    current: float = 0.0  # smooth weighted round robin state
    pulled: int = 0

    def ready_at(self) -> float:
        return max(self.retry_at, self.idle_until)


@dataclass(frozen=True, slots=True)
class Selection:
    executor: ExecutorState
    why: str
    key: str | None
    candidates: list[ev.Candidate]
    slot: str | None = None  # the fleet-wide slot leased for it (SHARED_CAPACITY)


class Router:
    """Pulls tasks while there is free healthy capacity and routes each one."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        session: aiohttp.ClientSession,
        *,
        view: StatusView | None = None,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.session = session
        self.view = view
        self.rng = rng or random.Random()
        self.queue = QueueClient(
            session,
            settings.queue_service_url,
            api_key=settings.queue_api_key,
            timeout_s=settings.queue_timeout_s,
        )
        weights = settings.queue_weights or (1.0,) * len(settings.queue_urls())
        self.queues = [
            QueueSource(
                url, self.queue if url == self.queue.base_url else self.queue.with_base_url(url), w
            )
            for url, w in zip(settings.queue_urls(), weights, strict=True)
        ]
        self.discovery = discovery_for(settings, resolver)
        static = isinstance(self.discovery, StaticDiscovery)
        self.pool = ExecutorPool(
            store,
            session,
            settings.executor_endpoints() if static else (),
            settings.executor_capacity,
            health_timeout_s=settings.health_timeout_s,
            health_stale_s=settings.health_stale_s,
            capacities=dict(settings.executor_capacities),
            healthy_threshold=settings.healthy_threshold,
            unhealthy_threshold=settings.unhealthy_threshold,
            eject_after_failures=settings.eject_after_failures,
            eject_base_s=settings.eject_base_s,
            eject_max_s=settings.eject_max_s,
            learn_capacity=settings.learn_capacity,
        )
        self.balancer = make_balancer(
            settings.routing_strategy, self.rng, dict(settings.executor_weights)
        )
        self.slots = SharedSlots(store.redis, store.keys) if settings.shared_capacity else None
        self.reserved = 0  # tasks pulled and not yet terminal (on an executor, or waiting)
        self.waiting = 0  # tasks waiting for a free slot (pulled ahead, or retrying)
        self.polls = 0
        self.empty_polls = 0
        self.queue_errors = 0
        self.leases: dict[str, float] = {}  # eval_id -> lease_s, while in flight
        self._lease_queue: dict[str, QueueClient] = {}  # eval_id -> where its lease is
        self._tasks: set[asyncio.Task[None]] = set()
        self._helpers: list[asyncio.Task[None]] = []
        self._open_pull: str | None = None
        self._stopping = False
        self._in_pull = False  # between asking the queue and recording its answer

    @property
    def in_flight(self) -> int:
        return self.reserved

    def queue_client(self, url: str | None) -> QueueClient:
        """The client of the queue at ``url`` (``None``: the default queue)."""
        if url is None:
            return self.queue
        for q in self.queues:
            if q.url == url:
                return q.client
        return self.queue.with_base_url(url)  # a queue of an earlier configuration

    # --- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Announce, recover, check the executors, then pull until cancelled."""
        if not isinstance(self.discovery, StaticDiscovery):
            try:
                self.pool.set_members(await self.discovery.resolve())
            except DiscoveryError as exc:  # start empty; the discovery loop tries again
                log.warning("discovery_failed", provider=self.discovery.name, error=str(exc))
        await self.store.append(
            ev.WorkerStarted(
                version=__version__,
                executors=[x.url for x in self.pool.executors],
                strategy=self.balancer.name,
                capacity=self.settings.executor_capacity,
                discovery=self.discovery.name,
                queues=[q.url for q in self.queues],
            )
        )
        self._helpers = [
            asyncio.create_task(self.pool.monitor(self.settings.health_interval_s)),
            asyncio.create_task(self._renew_leases()),
        ]
        if self.discovery.interval_s is not None:
            self._helpers.append(asyncio.create_task(self._discover(self.discovery.interval_s)))
        if self.view is not None:
            self._helpers.append(asyncio.create_task(self._take_over_dead_peers(self.view)))
        await self.pool.check_all()
        if self.view is not None:
            await self.recover(self.view)
        await self._pull_loop()

    async def stop(self, running: asyncio.Task[None] | None, grace_s: float) -> None:
        """Graceful stop: stop pulling (never in the middle of a pull), let in-flight
        tasks finish for up to ``grace_s``, then append ``worker.stopped``.

        A task still running then is cancelled without a terminal event: the next
        start recovers it.
        """
        self._stopping = True
        await self.pool.notify()
        if running is not None:
            if self._in_pull:  # let the pull record its answer, unless it cannot (Redis down)
                await asyncio.wait({running}, timeout=self.settings.queue_timeout_s + 1)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        left = list(self._tasks)
        for task in left + self._helpers:
            task.cancel()
        await asyncio.gather(*left, *self._helpers, return_exceptions=True)
        try:
            async with asyncio.timeout(STOP_RECORD_TIMEOUT_S):  # Redis may be down
                await self.store.append(ev.WorkerStopped(reason="shutdown", in_flight=len(left)))
        except (*RECORDING_ERRORS, TimeoutError) as exc:
            log.error("worker_stopped_not_recorded", error=str(exc))

    def _spawn(
        self,
        task: ev.Task,
        queue: str,
        first_attempt: int = 1,
        dispatched: Selection | None = None,
    ) -> None:
        worker = asyncio.create_task(
            self._route(task, queue, first_attempt, dispatched), name=f"route-{task.eval_id}"
        )
        self._tasks.add(worker)
        worker.add_done_callback(self._tasks.discard)

    async def _discover(self, interval_s: float) -> None:
        """Resolve the executors again every ``interval_s``; apply what changed."""
        provider = self.discovery
        while True:
            await asyncio.sleep(interval_s)
            try:
                urls = await provider.resolve()
                await self.pool.sync(urls, provider.name)
            except DiscoveryError as exc:
                log.warning("discovery_failed", provider=provider.name, error=str(exc))
            except RECORDING_ERRORS as exc:
                log.error("membership_not_recorded", error=str(exc))

    # --- recovery ------------------------------------------------------------

    async def recover(self, view: StatusView, owner: str | None = None) -> None:
        """Finish what a worker left: open pulls and unfinished tasks.

        ``owner`` is a dead peer being taken over; by default this worker's own
        previous run, unless a peer is taking it over right now.
        """
        me = self.settings.worker_id
        keys = self.store.keys
        if owner is None and not await claim(self.store.redis, keys.takeover(me), me):
            log.warning("recovery_left_to_peer", holder="another replica")
            return
        try:
            await self._recover(view, owner or me, taken_from=owner)
        finally:
            if owner is None:
                await release_claim(self.store.redis, keys.takeover(me), me)

    async def _recover(self, view: StatusView, owner: str, taken_from: str | None) -> None:
        mine = view.workers.get(owner)
        if mine is not None and mine.open_pull is not None:
            counts = await asyncio.gather(*(q.client.running_count() for q in self.queues))
            known = [n for n in counts if n is not None]
            running = sum(known) if known else None
            log.warning("pull_interrupted", pull_id=mine.open_pull, queue_running=running)
            await self.store.append(
                ev.PullInterrupted(pull_id=mine.open_pull, queue_running=running, owner=taken_from)
            )
        for eval_id, state in list(view.in_flight.items()):
            if state.worker_id == owner:
                await self._recover_task(
                    eval_id, state.pulled_id, state.stage, state.attempt, taken_from
                )

    async def _take_over_dead_peers(self, view: StatusView) -> None:
        """Every ``TAKEOVER_INTERVAL_S``: recover the tasks of peers whose liveness key is
        gone; a takeover claim makes exactly one replica do it."""
        me, redis, keys = self.settings.worker_id, self.store.redis, self.store.keys
        while True:
            await asyncio.sleep(self.settings.takeover_interval_s)
            owners = {t.worker_id for t in view.in_flight.values()}
            owners |= {w for w, v in view.workers.items() if v.open_pull is not None}
            owners.discard(me)
            try:
                for dead in await dead_workers(redis, keys, sorted(owners)):
                    if not await claim(redis, keys.takeover(dead), me, keep=True):
                        continue
                    if not await dead_workers(redis, keys, [dead]):
                        continue  # it came back meanwhile: its own start recovers it
                    log.warning("taking_over", worker=dead)
                    if self.slots is not None:  # its slots need not wait for their expiry
                        urls = [x.url for x in self.pool.executors]
                        await self.slots.release_worker(urls, dead)
                    await self.recover(view, owner=dead)
            except RECORDING_ERRORS as exc:
                log.error("takeover_failed", error=str(exc))

    async def _recover_task(
        self, eval_id: str, pulled_id: str, stage: str, attempt: int, taken_from: str | None
    ) -> None:
        raws = await self.store.redis.xrange(self.store.keys.events, pulled_id, pulled_id)
        pulled = parse_pulled(raws)
        queue_url = None if pulled is None else pulled.queue
        queue = self.queue_client(queue_url)

        def recovered(action: Any) -> ev.TaskRecovered:
            return ev.TaskRecovered(
                eval_id=eval_id,
                action=action,
                stage=stage,
                previous_attempt=attempt,
                owner=taken_from,
            )

        if pulled is not None and pulled.lease_s is not None:
            try:
                held = await queue.renew(eval_id, pulled.lease_s)
            except ReportRefused:
                held = False
            if not held:
                log.warning("task_lease_lost", eval_id=eval_id)
                await self.store.append(recovered("lease_lost"))
                return
            self.leases[eval_id] = pulled.lease_s
            self._lease_queue[eval_id] = queue
        if pulled is None or self.settings.recovery_policy == "fail":
            why = "its task.pulled entry is gone" if pulled is None else "RECOVERY_POLICY=fail"
            await self.store.append(
                recovered("fail"),
                ev.TaskFailed(
                    eval_id=eval_id,
                    attempt=attempt,
                    reason="worker_stopped",
                    error=f"the worker stopped while the task was {stage}; not re-run ({why})",
                    queue=queue_url,
                ),
            )
            self.leases.pop(eval_id, None)
            self._lease_queue.pop(eval_id, None)
            return
        log.info("task_recovered", eval_id=eval_id, stage=stage, attempt=attempt + 1)
        await self.store.append(recovered("redispatch"))
        self.reserved += 1
        self._spawn(pulled.task, queue.base_url, first_attempt=attempt + 1)

    # --- pulling -------------------------------------------------------------

    def _has_capacity(self) -> bool:
        """Whether to pull: free healthy capacity, or ``PULL_AHEAD`` tasks beyond it so a
        slot that frees finds one waiting (never while no executor is healthy)."""
        capacity = self.pool.healthy_capacity()
        return capacity > 0 and self.reserved < capacity + self.settings.pull_ahead

    async def _wait_for_capacity(self) -> None:
        async with self.pool.changed:
            await self.pool.changed.wait_for(lambda: self._stopping or self._has_capacity())

    async def _pull_loop(self) -> None:
        while not self._stopping:
            await self._wait_for_capacity()
            if self._stopping:
                return
            if not self.store.available:  # no pull while its events could not be recorded
                await asyncio.sleep(0.2)
                continue
            try:
                room = await self._fleet_has_room()
            except RECORDING_ERRORS as exc:
                log.error("fleet_slots_unreadable", error=str(exc))
                room = False
            if not room:
                await asyncio.sleep(SLOT_POLL_S)
                continue
            self._in_pull = True
            try:
                pause_s = await self._pull_once()
            except RECORDING_ERRORS as exc:
                # No state change may happen without its event: wait for the store.
                log.error("event_store_unavailable", error=str(exc))
                pause_s = 1.0
            finally:
                self._in_pull = False
            if pause_s:
                await asyncio.sleep(pause_s)

    def _poll_order(self, ready: list[QueueSource]) -> list[QueueSource]:
        """Highest priority first; with weights, a smooth weighted turn picks the first."""
        if not self.settings.queue_weights or len(ready) == 1:
            return ready
        total = sum(q.weight for q in ready)
        for q in ready:
            q.current += q.weight
        first = max(ready, key=lambda q: q.current)
        first.current -= total
        return [first, *(q for q in ready if q is not first)]

    async def _pull_once(self) -> float:
        """Poll the ready queues in order until one hands out a task (or an invalid one);
        returns the seconds to pause before the next try."""
        now = time.monotonic()
        ready = [q for q in self.queues if q.ready_at() <= now]
        if not ready:
            return max(min(q.ready_at() for q in self.queues) - now, 0.001)
        if self._open_pull is None:
            self._open_pull = uuid.uuid4().hex[:16]
            await self.store.append(ev.PullStarted(pull_id=self._open_pull))
        pull_id = self._open_pull
        for q in self._poll_order(ready):
            self.polls += 1
            try:
                body = await q.client.next_task(self.settings.queue_lease_s or None)
            except QueueUnavailable as exc:
                await self._queue_failed(q, exc)
                continue
            if q.errors:
                log.info("queue_recovered", queue=q.url, after_errors=q.errors)
                await self.store.append(ev.QueueRecovered(after_errors=q.errors, queue=q.url))
                q.errors = 0
            if await self._take(body, pull_id, q):
                return 0.0
            self.empty_polls += 1
            q.idle_until = time.monotonic() + self.settings.poll_interval_s
        return 0.0

    async def _queue_failed(self, q: QueueSource, exc: QueueUnavailable) -> None:
        q.errors += 1
        self.queue_errors += 1
        settings = self.settings
        backoff = queue_backoff_s(
            q.errors, settings.queue_backoff_step_s, settings.queue_backoff_max_s
        )
        q.retry_at = time.monotonic() + backoff
        log.warning(
            "queue_unreachable", queue=q.url, errors=q.errors, backoff_s=backoff, error=str(exc)
        )
        await self.store.append(
            ev.QueueUnreachable(
                consecutive_errors=q.errors, backoff_s=backoff, reason=str(exc), queue=q.url
            )
        )

    async def _take(self, body: bytes, pull_id: str, q: QueueSource) -> bool:
        """Record what the queue answered and start routing it; ``False`` when it was empty."""
        try:
            task = parse_task(body, max_code_bytes=self.settings.max_code_bytes)
        except InvalidTask as bad:
            log.warning("task_rejected", reason=bad.reason, eval_id=bad.eval_id, queue=q.url)
            await self._append_closing_pull(
                ev.TaskRejected(
                    pull_id=pull_id,
                    eval_id=bad.eval_id,
                    reason=bad.reason,
                    excerpt=bad.excerpt,
                    queue=q.url,
                )
            )
            return True
        if task is None:
            return False
        self.reserved += 1
        if task.lease_s is not None:
            self.leases[task.eval_id] = task.lease_s
            self._lease_queue[task.eval_id] = q.client
        # Usually an executor can be chosen right away (fresh health, a free slot): then
        # the pull, the choice and the dispatch are recorded in one append.
        selection = self._select_now(task)
        try:
            pulled = ev.TaskPulled(
                eval_id=task.eval_id,
                pull_id=pull_id,
                task=task,
                code_bytes=len(task.code.encode()),
                lease_s=task.lease_s,
                queue=q.url,
            )
            await self._append_closing_pull(
                pulled, *(self._dispatch_events(task, selection, 1) if selection else ())
            )
        except BaseException:
            if selection is not None:
                selection.executor.in_flight -= 1
            self.reserved -= 1
            self.leases.pop(task.eval_id, None)
            self._lease_queue.pop(task.eval_id, None)
            raise
        q.pulled += 1
        self._spawn(task, q.url, dispatched=selection)
        return True

    async def _append_closing_pull(
        self, outcome: ev.TaskPulled | ev.TaskRejected, *after: ev.Event
    ) -> None:
        """Append a pull's outcome (and ``after`` it) together with the ``pull.started`` of
        the next pull: one round trip less before the next ``GET /tasks/next``."""
        self._open_pull = uuid.uuid4().hex[:16]
        try:
            await self.store.append(outcome, *after, ev.PullStarted(pull_id=self._open_pull))
        except BaseException:
            self._open_pull = None  # the next poll records its own pull.started
            raise

    async def _renew_leases(self) -> None:
        """Keep the leases of tasks in flight: renew each at a third of its length."""
        while True:
            period = min(self.leases.values(), default=self.settings.queue_lease_s or 60.0) / 3
            await asyncio.sleep(max(period, 0.05))
            leases = dict(self.leases)
            results = await asyncio.gather(
                *(
                    self._lease_queue.get(eval_id, self.queue).renew(eval_id, lease_s)
                    for eval_id, lease_s in leases.items()
                ),
                return_exceptions=True,
            )
            for eval_id, held in zip(leases, results, strict=True):
                if held is False:
                    log.warning("task_lease_lost", eval_id=eval_id)
                elif isinstance(held, BaseException):
                    log.warning("lease_renewal_failed", eval_id=eval_id, error=str(held))

    # --- routing -------------------------------------------------------------

    def _select_now(self, task: ev.Task) -> Selection | None:
        """A first choice made without waiting, or ``None`` when it would need to wait
        (shared slots, a stale health check, nothing free): ``_select`` then decides."""
        if self.slots is not None:
            return None
        members = list(self.pool.executors)
        key = task.routing_key if self.balancer.name == "sticky" else None
        # An executor due for a health check is left to _select, so that the strategy
        # (a round-robin turn, say) is not spent on a choice this path cannot make.
        snapshots = [
            replace(x.snapshot(), healthy=False) if self.pool.is_stale(x) else x.snapshot()
            for x in members
        ]
        decision = self.balancer.decide(snapshots, key)
        if decision is None:
            return None
        candidates = [x.candidate() for x in members]
        chosen = members[decision.index]
        chosen.in_flight += 1
        return Selection(chosen, decision.why, decision.key, candidates)

    def _dispatch_events(
        self, task: ev.Task, selection: Selection, attempt: int
    ) -> tuple[ev.ExecutorSelected, ev.TaskDispatched]:
        url = selection.executor.url
        return (
            ev.ExecutorSelected(
                eval_id=task.eval_id,
                executor=url,
                strategy=self.balancer.name,
                attempt=attempt,
                candidates=selection.candidates,
                why=selection.why,
                key=selection.key,
            ),
            ev.TaskDispatched(
                eval_id=task.eval_id,
                executor=url,
                attempt=attempt,
                timeout_s=task.timeout or self.settings.default_task_timeout_s,
            ),
        )

    async def _select(self, task: ev.Task, avoid: set[str]) -> Selection | None:
        """Reserve a slot on a routable executor, or ``None`` when none is routable.

        Executors in ``avoid`` (those a task already failed on) are used only when no
        other one is routable.
        """
        pool = self.pool
        key = task.routing_key if self.balancer.name == "sticky" else None
        while True:
            members = list(pool.executors)
            if not any(x.routable for x in members):
                return None
            if self.slots is not None:
                counts = await self.slots.in_use([x.url for x in members])
                for x in members:
                    x.fleet_in_flight = counts[x.url]
            others = [x for x in members if x.url not in avoid]
            pick_from = others if any(x.routable for x in others) else members
            decision = self.balancer.decide([x.snapshot() for x in pick_from], key)
            if decision is None:  # all full: wait for a slot (or a health change)
                self.waiting += 1
                try:
                    if self.slots is None:
                        await self._wait_for_slot(pick_from, pool.membership)
                    else:  # other replicas free slots without telling us: look again soon
                        await asyncio.sleep(SLOT_POLL_S)
                finally:
                    self.waiting -= 1
                continue
            candidates = [x.candidate() for x in members]
            chosen = pick_from[decision.index]
            chosen.in_flight += 1
            if pool.is_stale(chosen) and not await pool.check(chosen):
                chosen.in_flight -= 1
                await pool.notify()
                continue
            slot = await self._lease_slot(chosen, task)
            if slot is False:  # the fleet filled it meanwhile
                chosen.in_flight -= 1
                chosen.fleet_in_flight = chosen.capacity
                await asyncio.sleep(SLOT_POLL_S)
                continue
            why = decision.why
            skipped = sorted(url for url in avoid if url in {x.url for x in members})
            if skipped and pick_from is others:
                why += f"; not {', '.join(skipped)} (failed this task before)"
            elif skipped:
                why += "; every routable executor failed this task before"
            return Selection(
                chosen, why, decision.key, candidates, slot if isinstance(slot, str) else None
            )

    async def _lease_slot(self, chosen: ExecutorState, task: ev.Task) -> str | bool:
        """A fleet-wide slot on ``chosen`` (its token), ``False`` when the fleet has none
        free there, ``True`` when slots are not shared."""
        if self.slots is None:
            return True
        token = f"{self.settings.worker_id}:{task.eval_id}:{uuid.uuid4().hex[:8]}"
        timeout_s = task.timeout or self.settings.default_task_timeout_s
        ttl_ms = int((timeout_s + self.settings.dispatch_margin_s + SLOT_SLACK_S) * 1000)
        if await self.slots.acquire(chosen.url, token, chosen.capacity, ttl_ms):
            return token
        return False

    async def _fleet_has_room(self) -> bool:
        """With shared slots: whether the fleet leaves a slot for one more task of ours."""
        if self.slots is None:
            return True
        routable = [x for x in self.pool.executors if x.routable]
        counts = await self.slots.in_use([x.url for x in routable])
        used = sum(max(counts[x.url], x.in_flight) for x in routable)
        waiting = self.reserved - sum(x.in_flight for x in self.pool.executors)
        return used + waiting < sum(x.capacity for x in routable) + self.settings.pull_ahead

    async def _wait_for_slot(self, executors: list[ExecutorState], membership: int) -> None:
        pool = self.pool

        def ready() -> bool:
            if pool.membership != membership or not pool.any_healthy():
                return True
            group = [x for x in executors if not x.removed]
            if not any(x.routable for x in group):
                return True  # the executors to pick from change
            return any(x.routable and x.in_flight < x.capacity for x in group)

        async with pool.changed:
            await pool.changed.wait_for(ready)

    async def _route(
        self,
        task: ev.Task,
        queue: str,
        first_attempt: int = 1,
        dispatched: Selection | None = None,
    ) -> None:
        """Route ``task`` until it is terminal: retry retryable failures elsewhere.

        ``dispatched``: the first attempt's executor, already chosen and recorded."""
        log_ = log.bind(eval_id=task.eval_id)
        try:
            terminal = await self._attempts(task, first_attempt, log_, dispatched)
            await self._append_terminal(msgspec.structs.replace(terminal, queue=queue))
        except RECORDING_ERRORS as exc:
            log_.error("task_outcome_not_recorded", error=str(exc))
        finally:
            # Released once the outcome is recorded: by then a task pulled ahead has taken
            # the slot, and the next pull does not compete with its dispatch.
            self.reserved -= 1
            self.leases.pop(task.eval_id, None)
            self._lease_queue.pop(task.eval_id, None)
            await self.pool.notify()

    async def _observe(self, chosen: ExecutorState, outcome: Executed | ExecutionFailed) -> None:
        """Feed the outcome to the executor's latency average, health and ejection count."""
        pool = self.pool
        if isinstance(outcome, Executed):
            pool.dispatch_succeeded(chosen, outcome.duration_ms)
            return
        chosen.failures += 1
        if outcome.reason not in ("executor_unreachable", "executor_http_error"):
            chosen.observe_latency(outcome.duration_ms)  # it answered, or took too long
        if outcome.unreachable:
            await pool.record_health(chosen, False, outcome.error, None, at_once=True)
        detail, _ = cap_text(outcome.error, EJECT_REASON_BYTES)
        await pool.dispatch_failed(chosen, f"{outcome.reason}: {detail}", outcome.retryable)

    async def _attempts(
        self, task: ev.Task, first_attempt: int, log_: Any, dispatched: Selection | None = None
    ) -> ev.TaskCompleted | ev.TaskFailed:
        settings = self.settings
        timeout_s = task.timeout or settings.default_task_timeout_s
        failures: list[ev.AttemptFailure] = []
        avoid: set[str] = set()
        attempt = first_attempt
        while True:
            selection = dispatched or await self._select(task, avoid)
            if selection is None:
                log_.warning("no_healthy_executor", attempt=attempt)
                error = "no healthy executor available"
                return ev.TaskFailed(
                    eval_id=task.eval_id,
                    attempt=attempt,
                    reason=NO_HEALTHY_EXECUTOR,
                    error=_with_history(error, failures),
                    attempts=[*failures, ev.AttemptFailure(
                        attempt=attempt, executor=None, reason=NO_HEALTHY_EXECUTOR, error=error
                    )],
                )  # fmt: skip
            chosen = selection.executor
            try:
                if dispatched is None:
                    await self.store.append(*self._dispatch_events(task, selection, attempt))
                dispatched = None
                chosen.routed += 1
                outcome = await execute(
                    self.session, chosen.url, task, timeout_s, settings.dispatch_margin_s
                )
            finally:
                chosen.in_flight -= 1
                if self.slots is not None and selection.slot is not None:
                    await self.slots.release(chosen.url, selection.slot)
            await self.pool.notify()  # a task pulled ahead may take the slot at once
            await asyncio.sleep(0)  # and goes first: its dispatch is on the critical path
            await self._observe(chosen, outcome)
            if isinstance(outcome, Executed):
                log_.info("task_completed", executor=chosen.url, ms=round(outcome.duration_ms, 1))
                return ev.TaskCompleted(
                    eval_id=task.eval_id,
                    executor=chosen.url,
                    attempt=attempt,
                    result=outcome.result,
                    duration_ms=outcome.duration_ms,
                )
            error, _ = cap_text(outcome.error, settings.max_output_bytes)
            failures.append(
                ev.AttemptFailure(
                    attempt=attempt, executor=chosen.url, reason=outcome.reason, error=error
                )
            )
            if outcome.retryable and attempt < settings.max_attempts:
                delay_ms = retry_delay_ms(
                    attempt, settings.retry_base_ms, settings.retry_max_ms, self.rng
                )
                log_.warning(
                    "task_retry_scheduled",
                    executor=chosen.url,
                    reason=outcome.reason,
                    attempt=attempt + 1,
                    delay_ms=delay_ms,
                )
                await self.store.append(
                    ev.TaskRetryScheduled(
                        eval_id=task.eval_id,
                        executor=chosen.url,
                        attempt=attempt + 1,
                        delay_ms=delay_ms,
                        reason=outcome.reason,
                        error=error,
                    )
                )
                await asyncio.sleep(delay_ms / 1000)
                avoid.add(chosen.url)
                attempt += 1
                continue
            log_.warning("task_failed", executor=chosen.url, reason=outcome.reason, error=error)
            return ev.TaskFailed(
                eval_id=task.eval_id,
                executor=chosen.url,
                attempt=attempt,
                reason=outcome.reason,
                error=_with_history(error, failures[:-1]),
                result=outcome.result,
                duration_ms=outcome.duration_ms,
                attempts=failures,
            )

    async def _append_terminal(self, terminal: ev.TaskCompleted | ev.TaskFailed) -> None:
        """Append the outcome; a result too large for the stream is kept in full beside it."""
        if terminal.result is None:
            await self.store.append(terminal)
            return
        capped, truncated = cap_result(terminal.result, self.settings.max_output_bytes)
        if truncated:
            key = self.store.keys.result(terminal.eval_id)
            await self.store.redis.set(key, msgspec.json.encode(terminal.result), ex=RESULT_TTL_S)
            terminal = msgspec.structs.replace(terminal, result=capped, truncated=True)
        await self.store.append(terminal)


def _with_history(error: str, earlier: list[ev.AttemptFailure]) -> str:
    """The last error, followed by what each earlier attempt ran into."""
    if not earlier:
        return error
    history = "; ".join(
        f"attempt {f.attempt} on {f.executor}: {f.reason}: {f.error}" for f in earlier
    )
    return f"{error} (earlier: {history})"


def parse_pulled(raws: list[Any]) -> ev.TaskPulled | None:
    """The ``task.pulled`` event in an ``XRANGE id id`` answer, if it is one."""
    entries = parse_entries(raws)
    if entries and isinstance(entries[0].event, ev.TaskPulled):
        return entries[0].event
    return None
