"""The executor pool: membership, live health and load, health checks, ejection.

Health works like a load balancer's: every executor is checked (``GET /health``)
every ``HEALTH_INTERVAL_S``; ``UNHEALTHY_THRESHOLD`` failed checks in a row make
it unhealthy and ``HEALTHY_THRESHOLD`` passed ones healthy again (a first check
decides at once; a refused connection on dispatch flips it at once). Only flips
are appended (``executor.health_changed``).

Passive ejection: ``EJECT_AFTER_FAILURES`` retryable dispatch failures in a row
(unreachable, no answer, 5xx) eject the executor for ``EJECT_BASE_S``, doubled
for each ejection since it last served cleanly for ``EJECT_MAX_S``, capped at
``EJECT_MAX_S`` (``executor.ejected``). It rejoins after a passed check once that
time is over (``executor.rejoined``). The last routable executor is never ejected.

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
import msgspec
import redis.asyncio as aioredis
import structlog

from queue_worker.errors import QueueWorkerError
from queue_worker.router.balancer import Snapshot
from queue_worker.streams.events import (
    Candidate,
    Event,
    ExecutorAdded,
    ExecutorCapacityChanged,
    ExecutorEjected,
    ExecutorHealthChanged,
    ExecutorRejoined,
    ExecutorRemoved,
)
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

LATENCY_EWMA_ALPHA = 0.3  # weight of the newest /execute duration in the moving average
# A latency figure not refreshed for this long is dropped: the executor counts as "no
# figure" again and gets tried, so one slow spell does not keep it idle for ever.
LATENCY_STALE_S = 10.0
RECORDING_ERRORS = (aioredis.RedisError, OSError, QueueWorkerError)


@dataclass(slots=True)
class ExecutorState:
    """What this process knows about one executor right now."""

    url: str
    capacity: int
    healthy: bool = False
    checked: bool = False
    last_check_monotonic: float = 0.0
    last_check_ms: int | None = None
    latency_ms: float | None = None  # of the last GET /health
    health_reason: str = "not checked yet"
    in_flight: int = 0
    routed: int = 0
    failures: int = 0
    configured_capacity: int = 0
    latency_ewma_ms: float | None = None  # of /execute answers
    latency_observed: float = 0.0  # monotonic
    passes_in_row: int = 0
    fails_in_row: int = 0
    dispatch_failures_in_row: int = 0
    ejected: bool = False
    ejected_at: float = 0.0  # monotonic
    ejected_until: float = 0.0  # monotonic
    ejections: int = 0
    last_ejection_end: float | None = None
    removed: bool = False
    fleet_in_flight: int = 0  # every replica's, from the shared slots (SHARED_CAPACITY)

    def __post_init__(self) -> None:
        self.configured_capacity = self.configured_capacity or self.capacity

    @property
    def routable(self) -> bool:
        """Healthy by its checks and not ejected: a strategy may pick it."""
        return self.healthy and not self.ejected and not self.removed

    def routing_latency_ms(self) -> float | None:
        """The latency EWMA, unless it is older than ``LATENCY_STALE_S``."""
        if time.monotonic() - self.latency_observed > LATENCY_STALE_S:
            return None
        return self.latency_ewma_ms

    def snapshot(self) -> Snapshot:
        return Snapshot(
            url=self.url,
            healthy=self.routable,
            in_flight=max(self.in_flight, self.fleet_in_flight),
            capacity=self.capacity,
            latency_ms=self.routing_latency_ms(),
        )

    def candidate(self) -> Candidate:
        ewma = self.routing_latency_ms()
        return Candidate(
            executor=self.url,
            healthy=self.healthy,
            in_flight=self.in_flight,
            capacity=self.capacity,
            latency_ms=None if ewma is None else round(ewma, 1),
            ejected=self.ejected,
        )

    def observe_latency(self, duration_ms: float) -> None:
        """Fold one ``/execute`` duration into the moving average."""
        previous = self.routing_latency_ms()
        self.latency_observed = time.monotonic()
        self.latency_ewma_ms = (
            duration_ms
            if previous is None
            else previous + LATENCY_EWMA_ALPHA * (duration_ms - previous)
        )


def ejection_s(ejections: int, base_s: float, max_s: float) -> float:
    """The ``ejections``-th ejection's length: base, 2*base, 4*base ... capped at ``max_s``."""
    doublings = min(max(ejections - 1, 0), 60)
    return round(min(base_s * float(1 << doublings), max_s), 3)


class _HealthAnswer(msgspec.Struct):
    status: str
    capacity: int | None = None


_health_decoder = msgspec.json.Decoder(_HealthAnswer)


@dataclass(frozen=True, slots=True)
class Probe:
    """One ``GET /health``: its verdict, why, how long it took and any capacity it announced."""

    healthy: bool
    reason: str
    latency_ms: float | None
    capacity: int | None = None


async def probe(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Probe:
    """``GET <url>/health``."""
    started = time.perf_counter()
    try:
        async with session.get(
            f"{url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            body = await resp.read()
            latency_ms = (time.perf_counter() - started) * 1000
            if resp.status != 200:
                return Probe(False, f"health answered HTTP {resp.status}", latency_ms)
            try:
                answer = _health_decoder.decode(body)
            except msgspec.DecodeError:
                return Probe(False, 'health answer is not {"status": ...} JSON', latency_ms)
            if answer.status != "healthy":
                return Probe(False, f"health status is {answer.status!r}", latency_ms)
            return Probe(True, "ok", latency_ms, answer.capacity)
    except TimeoutError:
        return Probe(False, f"no health answer within {timeout_s:g}s", None)
    except aiohttp.ClientError as exc:
        return Probe(False, f"{type(exc).__name__}: {exc}", None)


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
    executors: list[ExecutorState] = field(init=False)
    changed: asyncio.Condition = field(init=False, default_factory=asyncio.Condition)
    _retired: dict[str, ExecutorState] = field(init=False, default_factory=dict)
    _checkers: dict[str, asyncio.Task[None]] = field(init=False, default_factory=dict)
    _interval_s: float | None = field(init=False, default=None)
    membership: int = field(init=False, default=0)  # bumped by every membership change

    def __post_init__(self) -> None:
        self.executors = [self._new(u) for u in self.urls]

    def _new(self, url: str) -> ExecutorState:
        return ExecutorState(url=url, capacity=self.capacities.get(url, self.capacity))

    def healthy_capacity(self) -> int:
        """Slots on routable executors (healthy and not ejected)."""
        return sum(x.capacity for x in self.executors if x.routable)

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
        if healthy:
            x.passes_in_row, x.fails_in_row = x.passes_in_row + 1, 0
        else:
            x.passes_in_row, x.fails_in_row = 0, x.fails_in_row + 1
        first = not x.checked
        x.checked = True
        events: list[Event] = []
        if first:
            flip = True  # the first check decides at once (and counts as a flip from unknown)
        elif healthy == x.healthy:
            flip = False
        elif healthy:
            flip = x.passes_in_row >= self.healthy_threshold
        else:
            flip = at_once or x.fails_in_row >= self.unhealthy_threshold
        if flip:
            checks = 1 if first or at_once else max(x.passes_in_row, x.fails_in_row)
            x.healthy = healthy
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
            x.ejected = False
            x.last_ejection_end = now
            ejected_s = round(now - x.ejected_at, 3)
            log.info("executor_rejoined", executor=x.url, ejected_s=ejected_s)
            events.append(
                ExecutorRejoined(
                    executor=x.url,
                    ejected_s=ejected_s,
                    reason=f"health check passed after the ejection ({reason})",
                )
            )
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
        if not any(o.routable for o in self.executors if o is not x):
            log.warning("executor_not_ejected_last", executor=x.url, reason=reason)
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
        await self._append(
            ExecutorEjected(
                executor=x.url,
                consecutive_failures=failures,
                ejection_s=seconds,
                ejections=x.ejections,
                reason=reason,
            )
        )
        await self.notify()

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
        self.executors.append(x)
        self.membership += 1
        log.info("executor_added", executor=url, provider=provider)
        await self._append(ExecutorAdded(executor=url, provider=provider, capacity=x.capacity))
        if self._interval_s is not None:
            self._start_checker(x, first_now=True)
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
        checker = self._checkers.pop(url, None)
        if checker is not None:
            checker.cancel()
        log.info("executor_removed", executor=url, provider=provider, in_flight=x.in_flight)
        await self._append(ExecutorRemoved(executor=url, provider=provider, in_flight=x.in_flight))
        await self.notify()

    # --- the monitor ---------------------------------------------------------------

    def _start_checker(self, x: ExecutorState, *, first_now: bool = False) -> None:
        assert self._interval_s is not None
        self._checkers[x.url] = asyncio.create_task(
            self._check_forever(x, self._interval_s, first_now), name=f"health-{x.url}"
        )

    async def _check_forever(self, x: ExecutorState, interval_s: float, first_now: bool) -> None:
        """Check ``x`` every ``interval_s``, and as soon as an ejection runs out."""
        delay = 0.0 if first_now else interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await self.check(x)
            except RECORDING_ERRORS as exc:  # Redis down: the next check tries again
                log.warning("health_not_recorded", executor=x.url, error=str(exc))
            delay = interval_s
            if x.ejected:
                delay = min(interval_s, max(x.ejected_until - time.monotonic(), 0.0) + 0.001)

    async def monitor(self, interval_s: float) -> None:
        """Check every executor (one task each, so a hanging check stalls no other)."""
        self._interval_s = interval_s
        for x in self.executors:
            if x.url not in self._checkers:
                self._start_checker(x)
        try:
            await asyncio.Event().wait()
        finally:
            self._interval_s = None
            checkers = list(self._checkers.values())
            self._checkers.clear()
            for task in checkers:
                task.cancel()
            await asyncio.gather(*checkers, return_exceptions=True)
