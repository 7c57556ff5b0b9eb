"""Choosing an executor for a task: one path, with or without waiting for a slot.

:meth:`Selector.choose` asks the strategy among the routable executors with a
free slot, reserves the slot (and, with ``SHARED_CAPACITY``, a fleet-wide slot
in Redis) and returns a :class:`Selection` that knows how to give it back.
``wait=False`` never waits: it answers ``None`` when a choice would need to
(shared slots, a health check due, nothing free), which is what lets the pull,
the choice and the dispatch be recorded in one append; ``wait=True`` waits for a
slot or a health change, and answers ``None`` only when no executor is routable or
the wait reached ``until`` (a monotonic time: the task's deadline).

Slow start: when the strategy picks an executor still warming up (``SLOW_START_S``,
``ExecutorState.warmth`` below 1) while another one could take the task, the pick
stands with probability ``warmth`` and is otherwise made again without it, so its
share of the tasks ramps up with its warmth. Sticky routing keeps its keys where they
belong and skips this. Both this and panic (``PANIC_THRESHOLD``) are said in ``why``.

Priority: tasks waiting for a slot take the free slots in the order of their
effective priority, ``Task.priority`` (0 when absent) plus one for every
``PRIORITY_AGING_S`` waited, so that none starves; equal ones go by their queue's
place in ``QUEUE_SERVICE_URLS`` (without weights), then by arrival. A task does not
take a slot without waiting while others wait.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from dataclasses import dataclass, field, replace

import structlog

from queue_worker.router.balancer import Balancer, Decision, Snapshot, eligible
from queue_worker.router.executor_state import ExecutorState
from queue_worker.router.executors import ExecutorPool
from queue_worker.router.fleet import SharedRate, SharedSlots
from queue_worker.streams import events as ev
from queue_worker.streams.connection import REDIS_ERRORS

log = structlog.get_logger(__name__)

SLOT_POLL_S = 0.02  # with shared slots, how soon a replica looks again for a free one
SLOT_SLACK_S = 30.0  # a slot outlives its dispatch's HTTP timeout by this much
TURN_POLL_S = 0.1  # a task waiting its turn looks again this often at the latest


@dataclass(slots=True)
class Selection:
    """An executor chosen for one attempt, with its slot reserved until :meth:`release`."""

    executor: ExecutorState
    why: str
    key: str | None
    candidates: list[ev.Candidate]
    slots: SharedSlots | None = None
    slot: str | None = None  # the fleet-wide slot leased for it (SHARED_CAPACITY)

    def recorded(
        self, task: ev.Task, attempt: int, strategy: str, timeout_s: float
    ) -> tuple[ev.ExecutorSelected, ev.TaskDispatched]:
        """The entries that record this choice and the dispatch that follows it."""
        url = self.executor.url
        return (
            ev.ExecutorSelected(
                eval_id=task.eval_id,
                executor=url,
                strategy=strategy,
                attempt=attempt,
                candidates=self.candidates,
                why=self.why,
                key=self.key,
            ),
            ev.TaskDispatched(
                eval_id=task.eval_id, executor=url, attempt=attempt, timeout_s=timeout_s
            ),
        )

    async def release(self) -> None:
        """Give the slot back (the attempt is over, or was never sent)."""
        self.executor.in_flight -= 1
        if self.slots is not None and self.slot is not None:
            slot, self.slot = self.slot, None
            await self.slots.release(self.executor.url, slot)


@dataclass(slots=True)
class Waiter:
    """A task waiting for a slot: its priority, queue class, arrival and order."""

    priority: float
    rank: int  # its queue's place (0: the first queue)
    since: float  # monotonic
    seq: int
    waited: bool = field(default=False)

    def order(self, now: float, aging_s: float) -> tuple[float, int, int]:
        """Sorts first the task to serve first."""
        aged = (now - self.since) / aging_s if aging_s > 0 else 0.0
        return (-(self.priority + aged), self.rank, self.seq)


class Selector:
    """Chooses executors from ``pool`` with ``balancer``."""

    def __init__(
        self,
        pool: ExecutorPool,
        balancer: Balancer,
        *,
        slots: SharedSlots | None,
        rate: SharedRate | None = None,
        worker_id: str,
        default_timeout_s: float,
        dispatch_margin_s: float,
        rng: random.Random | None = None,
        aging_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.rng = rng or random.Random()
        self.aging_s = aging_s  # PRIORITY_AGING_S
        self._waiters: dict[int, Waiter] = {}
        self._seq = itertools.count()
        self.balancer = balancer
        self.slots = slots
        self.rate = rate
        self.worker_id = worker_id
        self.default_timeout_s = default_timeout_s
        self.dispatch_margin_s = dispatch_margin_s
        self.waiting = 0  # tasks waiting for a free slot (pulled ahead, or retrying)

    def _key(self, task: ev.Task) -> str | None:
        return task.routing_key if self.balancer.name == "sticky" else None

    async def choose(
        self,
        task: ev.Task,
        avoid: frozenset[str] = frozenset(),
        *,
        wait: bool = True,
        until: float | None = None,
        rank: int = 0,
    ) -> Selection | None:
        """Reserve a slot on a routable executor for ``task``; executors in ``avoid`` (those
        it failed on) only when no other one is routable. Waits no later than ``until``;
        ``rank`` is the place of the task's queue (its priority class)."""
        if not wait:
            return self._choose_now(task)
        me = Waiter(float(task.priority or 0), rank, time.monotonic(), next(self._seq))
        self._waiters[me.seq] = me
        try:
            return await self._choose(task, avoid, until, me)
        finally:
            del self._waiters[me.seq]
            if self._waiters:  # the next in line may take a slot now
                await self.pool.notify()

    async def _choose(
        self, task: ev.Task, avoid: frozenset[str], until: float | None, me: Waiter
    ) -> Selection | None:
        pool = self.pool
        paced: set[str] = set()  # executors passed over at their rate limit
        while True:
            members = list(pool.executors)
            if not any(x.routable for x in members):
                return None
            if until is not None and time.monotonic() >= until:
                return None
            if self.slots is not None:
                counts = await self.slots.in_use([x.url for x in members])
                for x in members:
                    x.fleet_in_flight = counts[x.url]
            others = [x for x in members if x.url not in avoid]
            pick_from = others if any(x.routable for x in others) else members
            ahead = self._ahead_of(me)
            if ahead and ahead >= _free_slots(pick_from):  # the slots go to those first
                me.waited = True
                await self._wait_turn(until)
                continue
            decision = self._decide(pick_from, [x.snapshot() for x in pick_from], task)
            if decision is None:  # all full: wait for a slot (or a health change)
                me.waited = True
                await self._wait(pick_from, until)
                continue
            chosen = pick_from[decision.index]
            chosen.in_flight += 1
            try:
                stale = pool.is_stale(chosen) and not await pool.check(chosen)
                slot = False if stale else await self._lease_slot(chosen, task)
                wait_s = 0.0 if slot is False else await self._pace(chosen)
            except asyncio.CancelledError:  # a stop, or an operator's cancel of the task
                chosen.in_flight -= 1  # (a fleet slot leased meanwhile runs out with its TTL)
                raise
            if stale:
                chosen.in_flight -= 1
                await pool.notify()
                continue
            if slot is False:  # the fleet filled it meanwhile
                chosen.in_flight -= 1
                chosen.fleet_in_flight = chosen.capacity
                await asyncio.sleep(SLOT_POLL_S)
                continue
            if wait_s > 0:  # at its rate: not before wait_s
                token = slot if isinstance(slot, str) else None
                await Selection(chosen, "", None, [], self.slots, token).release()
                chosen.cooled_until = max(chosen.cooled_until, time.monotonic() + wait_s)
                paced.add(chosen.url)
                continue
            why = decision.why + _avoided(avoid, members, pick_from is others) + pool.panic_why()
            if paced:
                assert self.rate is not None
                limit = f"EXECUTOR_RATE_LIMIT {self.rate.per_s:g}/s"
                why += "".join(f"; {url} paced by {limit}" for url in sorted(paced))
            if me.waited and len(self._waiters) > 1:
                why += self._priority_why(me)
            candidates = [x.candidate() for x in members]
            token = slot if isinstance(slot, str) else None
            return Selection(chosen, why, decision.key, candidates, self.slots, token)

    def _choose_now(self, task: ev.Task) -> Selection | None:
        """A choice made without waiting, or ``None`` when it would need to wait."""
        if self.slots is not None or self.rate is not None or self._waiters:
            return None  # a round trip to Redis is needed, or those waiting go first
        members = list(self.pool.executors)
        # An executor due for a health check is left to the waiting path, so that the
        # strategy (a round-robin turn, say) is not spent on a choice this one cannot make.
        snapshots = [
            replace(x.snapshot(), healthy=False) if self.pool.is_stale(x) else x.snapshot()
            for x in members
        ]
        decision = self._decide(members, snapshots, task)
        if decision is None:
            return None
        chosen = members[decision.index]
        chosen.in_flight += 1
        why = decision.why + self.pool.panic_why()
        return Selection(chosen, why, decision.key, [x.candidate() for x in members])

    def _decide(
        self, executors: list[ExecutorState], snapshots: list[Snapshot], task: ev.Task
    ) -> Decision | None:
        """The strategy's decision, with executors still warming up passed over with the
        probability they lack (while another executor could take the task)."""
        key = self._key(task)
        passed: list[str] = []
        while True:
            decision = self.balancer.decide(snapshots, key)
            if decision is None or key is not None:
                return decision
            chosen = executors[decision.index]
            warmth = chosen.warmth()
            others = sum(eligible(x) for i, x in enumerate(snapshots) if i != decision.index)
            if warmth >= 1 or not others or self.rng.random() < warmth:
                if warmth < 1:
                    passed.append(f"{chosen.url} taken while warming up ({warmth:.0%})")
                why = decision.why + "".join(f"; {p}" for p in passed)
                return replace(decision, why=why)
            passed.append(f"{chosen.url} passed over: warming up ({warmth:.0%})")
            snapshots = [
                replace(x, healthy=False) if i == decision.index else x
                for i, x in enumerate(snapshots)
            ]

    def _ahead_of(self, me: Waiter) -> int:
        """How many waiting tasks go before ``me``."""
        if len(self._waiters) < 2:
            return 0
        now, aging = time.monotonic(), self.aging_s
        mine = me.order(now, aging)
        return sum(w.order(now, aging) < mine for w in self._waiters.values() if w is not me)

    def _priority_why(self, me: Waiter) -> str:
        """What ``why`` says of a task that took a slot while others waited."""
        aged = me.order(time.monotonic(), self.aging_s)[0] * -1
        behind = len(self._waiters) - 1
        return f"; served by priority {me.priority:g} (aged {aged:.2f}) with {behind} waiting"

    async def _wait_turn(self, until: float | None) -> None:
        """Wait while tasks before this one take the free slots (each one that leaves the
        line wakes the rest); looks again every ``TURN_POLL_S`` as aging reorders."""
        self.waiting += 1
        left = TURN_POLL_S if until is None else min(TURN_POLL_S, until - time.monotonic())
        try:
            async with asyncio.timeout(max(left, 0.0)), self.pool.changed:
                await self.pool.changed.wait()
        except TimeoutError:
            pass
        finally:
            self.waiting -= 1

    async def _wait(self, executors: list[ExecutorState], until: float | None) -> None:
        self.waiting += 1
        try:
            if self.slots is None:
                await self._wait_for_slot(executors, self.pool.membership, until)
            else:  # other replicas free slots without telling us: look again soon
                left = SLOT_POLL_S if until is None else until - time.monotonic()
                await asyncio.sleep(max(min(SLOT_POLL_S, left), 0.0))
        finally:
            self.waiting -= 1

    async def _wait_for_slot(
        self, executors: list[ExecutorState], membership: int, until: float | None
    ) -> None:
        pool = self.pool

        def ready() -> bool:
            if pool.membership != membership or not pool.any_healthy():
                return True
            group = [x for x in executors if not x.removed]
            if not any(x.routable for x in group):
                return True  # the executors to pick from change
            return any(x.pickable and x.in_flight < x.capacity for x in group)

        # An executor cooling down after a throttle is pickable again when that is over;
        # nothing announces it, so the wait ends then at the latest (or at ``until``).
        ends = [s for x in executors if x.routable and (s := x.cooling_s()) > 0]
        if until is not None:
            ends.append(max(until - time.monotonic(), 0.0))
        try:
            async with asyncio.timeout(min(ends) if ends else None), pool.changed:
                await pool.changed.wait_for(ready)
        except TimeoutError:
            pass

    async def _pace(self, chosen: ExecutorState) -> float:
        """With ``EXECUTOR_RATE_LIMIT``: 0 when a dispatch to ``chosen`` may go now (it is
        counted), else how long until one may. Redis failing does not stop dispatches."""
        if self.rate is None:
            return 0.0
        try:
            return await self.rate.take(chosen.url)
        except REDIS_ERRORS as exc:
            log.warning("rate_limit_unknown", executor=chosen.url, error=str(exc))
            return 0.0

    async def _lease_slot(self, chosen: ExecutorState, task: ev.Task) -> str | bool:
        """A fleet-wide slot on ``chosen`` (its token), ``False`` when the fleet has none
        free there, ``True`` when slots are not shared."""
        if self.slots is None:
            return True
        token = f"{self.worker_id}:{task.eval_id}:{uuid.uuid4().hex[:8]}"
        timeout_s = task.timeout or self.default_timeout_s
        ttl_ms = int((timeout_s + self.dispatch_margin_s + SLOT_SLACK_S) * 1000)
        if await self.slots.acquire(chosen.url, token, chosen.capacity, ttl_ms):
            return token
        return False

    async def fleet_has_room(self, held: int, pull_ahead: int) -> bool:
        """With shared slots: whether the fleet leaves a slot for one more task of ours
        (``held``: the tasks this worker holds)."""
        if self.slots is None:
            return True
        routable = [x for x in self.pool.executors if x.routable]
        counts = await self.slots.in_use([x.url for x in routable])
        used = sum(max(counts[x.url], x.in_flight) for x in routable)
        waiting = held - sum(x.in_flight for x in self.pool.executors)
        return used + waiting < sum(x.capacity for x in routable) + pull_ahead


def _free_slots(executors: list[ExecutorState]) -> int:
    """Slots a strategy could take now on ``executors``."""
    return sum(
        max(x.capacity - max(x.in_flight, x.fleet_in_flight), 0) for x in executors if x.pickable
    )


def _avoided(avoid: frozenset[str], members: list[ExecutorState], elsewhere: bool) -> str:
    """What ``why`` adds about the executors the task failed on before."""
    skipped = sorted(url for url in avoid if url in {x.url for x in members})
    if not skipped:
        return ""
    if elsewhere:
        return f"; not {', '.join(skipped)} (failed this task before)"
    return "; every routable executor failed this task before"
