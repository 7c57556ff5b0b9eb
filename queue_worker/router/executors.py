"""The executor pool: membership, live health and load, health checks, ejection.

The pool holds an :class:`~queue_worker.router.executor_state.ExecutorState` for
each member and decides for all of them together; the check loops are its
:class:`~queue_worker.router.monitor.HealthMonitor`.

Health works like a load balancer's: every executor is checked (``GET /health``)
every ``HEALTH_INTERVAL_S``; ``UNHEALTHY_THRESHOLD`` failed checks in a row make
it unhealthy and ``HEALTHY_THRESHOLD`` passed ones healthy again (a first check
decides at once; a refused connection on dispatch flips it at once). Only flips
are appended (``executor.health_changed``).

Passive ejection: ``EJECT_AFTER_FAILURES`` retryable dispatch failures in a row
(unreachable, no answer, 5xx) eject the executor for ``EJECT_BASE_S``, doubled
for each ejection since it last served cleanly for ``EJECT_MAX_S``, capped at
``EJECT_MAX_S`` (``executor.ejected``). It rejoins after a passed check once that
time is over (``executor.rejoined``). The last healthy executor is never ejected,
nor more than ``MAX_EJECTION_PERCENT`` of the executors (at least one may be).

Panic (``PANIC_THRESHOLD``): when fewer than that percent of the checked executors are
healthy and not ejected, every executor is routable (the health verdicts are taken to
be wrong rather than overload the few that pass); entering and leaving panic are
``routing.panic_entered`` / ``routing.panic_left``.

Slow start (``SLOW_START_S``): an executor that turns healthy again, rejoins after an
ejection or is added at runtime is warming up for that long: its :meth:`warmth` ramps
from 0 to 1, and the selector passes it over with the remaining probability when
another executor could take the task (see ``selection.py``).

Back-pressure: an executor that answers ``/execute`` with 429 or 503 is cooled
down for its ``Retry-After`` (``THROTTLE_DEFAULT_S`` without one; between
``THROTTLE_MIN_S`` and ``THROTTLE_MAX_S``): it stays routable, so tasks wait for it
rather than fail, but no strategy picks it until the cool-down is over
(``executor.throttled``). A throttle is not a dispatch failure: it neither ejects
nor marks the executor unhealthy.

Membership may change at runtime (:meth:`ExecutorPool.sync`, fed by discovery):
``executor.added`` / ``executor.removed``. A removed executor gets no new task;
those it runs finish normally (they hold its :class:`ExecutorState`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp
import structlog

from queue_worker.router.executor_state import ExecutorState
from queue_worker.router.health import probe
from queue_worker.router.monitor import HealthMonitor
from queue_worker.streams.events import (
    Event,
    ExecutorAdded,
    ExecutorCapacityChanged,
    ExecutorEjected,
    ExecutorHealthChanged,
    ExecutorRemoved,
    ExecutorThrottled,
    RoutingPanicEntered,
    RoutingPanicLeft,
)
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

THROTTLE_DEFAULT_S = 1.0  # the cool-down after a 429/503 without a Retry-After
THROTTLE_MIN_S = 0.05  # "Retry-After: 0" still spaces the next try out a little
THROTTLE_MAX_S = 60.0  # a longer Retry-After is capped: health checks still run


def ejection_s(ejections: int, base_s: float, max_s: float) -> float:
    """The ``ejections``-th ejection's length: base, 2*base, 4*base ... capped at ``max_s``."""
    doublings = min(max(ejections - 1, 0), 60)
    return round(min(base_s * float(1 << doublings), max_s), 3)


@dataclass
class ExecutorPool:
    """The executors, their health and their load; ``changed`` wakes waiters."""

    store: EventStore
    session: aiohttp.ClientSession
    urls: tuple[str, ...]
    capacity: int
    health_timeout_s: float = 2.0
    health_stale_s: float = 10.0
    capacities: dict[str, int] = field(default_factory=dict)
    healthy_threshold: int = 1
    unhealthy_threshold: int = 1
    eject_after_failures: int = 0
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    learn_capacity: bool = False
    max_ejection_percent: float = 100.0
    panic_threshold: float = 0.0
    slow_start_s: float = 0.0
    executors: list[ExecutorState] = field(init=False)
    panic: bool = field(init=False, default=False)
    panic_since: float = field(init=False, default=0.0)  # monotonic
    changed: asyncio.Condition = field(init=False, default_factory=asyncio.Condition)
    _retired: dict[str, ExecutorState] = field(init=False, default_factory=dict)
    monitor: HealthMonitor = field(init=False)  # the check loops (router/monitor.py)
    membership: int = field(init=False, default=0)  # bumped by every membership change

    def __post_init__(self) -> None:
        self.executors = [self._new(u) for u in self.urls]
        self.monitor = HealthMonitor(self.check)

    def _new(self, url: str) -> ExecutorState:
        return ExecutorState(url=url, capacity=self.capacities.get(url, self.capacity))

    def healthy_capacity(self) -> int:
        """Slots on routable executors (healthy and not ejected, or any in panic) that are
        not drained: what pulling fills."""
        return sum(x.capacity for x in self.executors if x.routable and not x.drained)

    def any_healthy(self) -> bool:
        return any(x.routable for x in self.executors)

    def is_stale(self, x: ExecutorState) -> bool:
        return time.monotonic() - x.last_check_monotonic > self.health_stale_s

    def get(self, url: str) -> ExecutorState | None:
        return next((x for x in self.executors if x.url == url), None)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _append(self, *events: Event) -> None:
        await self.store.append(*events)

    # --- health ----------------------------------------------------------------------

    async def record_health(
        self,
        x: ExecutorState,
        healthy: bool,
        reason: str,
        latency_ms: float | None,
        *,
        at_once: bool = False,
    ) -> None:
        """Store a check's result; append an event and wake waiters when it flips.

        ``at_once`` (a refused connection on dispatch) ignores ``UNHEALTHY_THRESHOLD``.
        """
        now = time.monotonic()
        x.last_check_monotonic = now
        x.last_check_ms = time.time_ns() // 1_000_000
        x.latency_ms = latency_ms
        x.health_reason = reason
        events: list[Event] = []
        warm_on_pass = x.warm_on_first_check or x.checked
        checks = x.count_check(healthy, at_once, self.healthy_threshold, self.unhealthy_threshold)
        if checks is not None:
            x.healthy = healthy
            if healthy and warm_on_pass:
                x.warm_up(self.slow_start_s, now)
            log.info(
                "executor_health_changed",
                executor=x.url,
                healthy=healthy,
                reason=reason,
                checks=checks,
            )
            events.append(
                ExecutorHealthChanged(
                    executor=x.url,
                    healthy=healthy,
                    reason=reason,
                    latency_ms=latency_ms,
                    checks=checks,
                )
            )
        if x.ejected and healthy and x.healthy and now >= x.ejected_until:
            events.append(x.rejoin(now, reason))
            x.warm_up(self.slow_start_s, now)
        if events and (panic := self._panic_change()) is not None:
            events.append(panic)
        if events:
            await self._append(*events)
            await self.notify()

    async def learn(self, x: ExecutorState, capacity: int | None) -> None:
        """Take the capacity an executor announces in its ``/health`` answer."""
        if capacity is None or capacity < 1 or capacity == x.capacity:
            return
        previous, x.capacity = x.capacity, capacity
        log.info("executor_capacity_changed", executor=x.url, capacity=capacity)
        await self._append(
            ExecutorCapacityChanged(
                executor=x.url, capacity=capacity, previous=previous, source="health"
            )
        )
        await self.notify()

    async def check(self, x: ExecutorState) -> bool:
        """Probe ``x`` now; whether it is routable afterwards."""
        result = await probe(self.session, x.url, self.health_timeout_s)
        if self.learn_capacity and result.healthy:
            await self.learn(x, result.capacity)
        await self.record_health(x, result.healthy, result.reason, result.latency_ms)
        return x.routable

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(x) for x in list(self.executors)))

    # --- passive ejection --------------------------------------------------------------

    async def dispatch_failed(self, x: ExecutorState, reason: str, retryable: bool) -> None:
        """Count a dispatch outcome that was not a result; eject after too many in a row."""
        if not retryable:
            x.dispatch_failures_in_row = 0
            return
        x.dispatch_failures_in_row += 1
        if (
            not self.eject_after_failures
            or x.ejected
            or x.removed
            or x.dispatch_failures_in_row < self.eject_after_failures
        ):
            return
        if not any(o.fit for o in self.executors if o is not x):
            log.warning("executor_not_ejected_last", executor=x.url, reason=reason)
            return
        if (ejected := sum(o.ejected for o in self.executors)) >= self.max_ejections():
            log.warning(
                "executor_not_ejected_max",
                executor=x.url,
                ejected=ejected,
                max_ejection_percent=self.max_ejection_percent,
                reason=reason,
            )
            return
        now = time.monotonic()
        if x.last_ejection_end is not None and now - x.last_ejection_end > self.eject_max_s:
            x.ejections = 0  # it served long enough since: start again from EJECT_BASE_S
        x.ejections += 1
        seconds = ejection_s(x.ejections, self.eject_base_s, self.eject_max_s)
        failures, x.dispatch_failures_in_row = x.dispatch_failures_in_row, 0
        x.ejected, x.ejected_at, x.ejected_until = True, now, now + seconds
        log.warning(
            "executor_ejected", executor=x.url, ejection_s=seconds, failures=failures, reason=reason
        )
        ejection = ExecutorEjected(
            executor=x.url,
            consecutive_failures=failures,
            ejection_s=seconds,
            ejections=x.ejections,
            reason=reason,
        )
        panic = self._panic_change()
        await self._append(ejection, *([] if panic is None else [panic]))
        await self.notify()

    def max_ejections(self) -> int:
        """How many executors may be ejected at once (``MAX_EJECTION_PERCENT``, at least
        one unless it is 0)."""
        if self.max_ejection_percent <= 0:
            return 0
        return max(1, int(len(self.executors) * self.max_ejection_percent / 100))

    # --- panic -------------------------------------------------------------------------

    def _panic_change(self) -> Event | None:
        """Enter or leave panic when the share of fit executors crossed
        ``PANIC_THRESHOLD``: the event that records it, else ``None``."""
        checked = [x for x in self.executors if x.checked]
        fit = sum(x.fit for x in checked)
        panic = (
            self.panic_threshold > 0
            and bool(checked)
            and fit * 100 < self.panic_threshold * len(checked)
        )
        if panic == self.panic:
            return None
        self.panic = panic
        for x in self.executors:
            x.in_panic = panic
        now, executors, threshold = time.monotonic(), len(checked), self.panic_threshold
        if panic:
            self.panic_since = now
            log.warning("routing_panic_entered", healthy=fit, executors=executors)
            return RoutingPanicEntered(
                healthy=fit, executors=executors, threshold_percent=threshold
            )
        lasted_s = round(now - self.panic_since, 3)
        log.info("routing_panic_left", healthy=fit, executors=executors, lasted_s=lasted_s)
        return RoutingPanicLeft(
            healthy=fit, executors=executors, threshold_percent=threshold, lasted_s=lasted_s
        )

    def panic_why(self) -> str:
        """What ``executor.selected``'s ``why`` says while in panic ('' when not)."""
        if not self.panic:
            return ""
        checked = [x for x in self.executors if x.checked]
        return (
            f"; panic: {sum(x.fit for x in checked)} of {len(checked)} executors healthy, "
            f"below PANIC_THRESHOLD {self.panic_threshold:g} %: routing across all"
        )

    # --- back-pressure -----------------------------------------------------------------

    async def throttle(
        self,
        x: ExecutorState,
        eval_id: str,
        http_status: int | None,
        retry_after_s: float | None,
    ) -> float:
        """``x`` declined ``eval_id`` for now: cool it down (at once, before any await) and
        record it; the cool-down's length."""
        asked = THROTTLE_DEFAULT_S if retry_after_s is None else retry_after_s
        seconds = round(min(max(asked, THROTTLE_MIN_S), THROTTLE_MAX_S), 3)
        x.cooled_until = max(x.cooled_until, time.monotonic() + seconds)
        x.throttles += 1
        log.info("executor_throttled", executor=x.url, eval_id=eval_id, cooldown_s=seconds)
        await self._append(
            ExecutorThrottled(
                executor=x.url,
                eval_id=eval_id,
                http_status=http_status,
                retry_after_s=retry_after_s,
                cooldown_s=seconds,
            )
        )
        return seconds

    def dispatch_succeeded(self, x: ExecutorState, duration_ms: float) -> None:
        x.dispatch_failures_in_row = 0
        x.observe_latency(duration_ms)

    # --- membership --------------------------------------------------------------------

    def set_members(self, urls: Iterable[str]) -> None:
        """The initial members, before the monitor starts (no events: ``worker.started``
        lists them)."""
        self.executors = [self._new(u) for u in dict.fromkeys(urls)]
        self.membership += 1

    async def sync(self, urls: Iterable[str], provider: str) -> None:
        """Make the members exactly ``urls``: append ``executor.added``/``executor.removed``."""
        wanted = list(dict.fromkeys(urls))
        self._retired = {u: x for u, x in self._retired.items() if x.in_flight}
        current = {x.url for x in self.executors}
        for url in [u for u in current if u not in wanted]:
            await self.remove(url, provider)
        for url in [u for u in wanted if u not in current]:
            await self.add(url, provider)

    async def add(self, url: str, provider: str) -> ExecutorState:
        x = self._retired.pop(url, None)  # back while tasks still run on it: keep its load
        if x is None or not x.in_flight:
            x = self._new(url)
        else:
            x.removed, x.checked, x.healthy = False, False, False
        x.warm_on_first_check, x.in_panic = True, self.panic
        self.executors.append(x)
        self.membership += 1
        log.info("executor_added", executor=url, provider=provider)
        await self._append(ExecutorAdded(executor=url, provider=provider, capacity=x.capacity))
        if self.monitor.interval_s is not None:
            self.monitor.watch(x, first_now=True)
        await self.notify()
        return x

    async def remove(self, url: str, provider: str) -> None:
        x = self.get(url)
        if x is None:
            return
        self.executors.remove(x)
        self.membership += 1
        x.removed = True
        if x.in_flight:
            self._retired[url] = x
        await self.monitor.unwatch(url)
        log.info("executor_removed", executor=url, provider=provider, in_flight=x.in_flight)
        removed = ExecutorRemoved(executor=url, provider=provider, in_flight=x.in_flight)
        panic = self._panic_change()
        await self._append(removed, *([] if panic is None else [panic]))
        await self.notify()
