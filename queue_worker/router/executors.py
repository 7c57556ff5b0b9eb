"""The executor pool: discovery, live health and load, and health checks.

Only health *flips* are appended to the stream (``executor.health_changed``);
a first check counts as a flip from "unknown".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec
import structlog

from queue_worker.streams.events import Candidate, ExecutorHealthChanged
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class ExecutorState:
    """What this process knows about one executor right now."""

    url: str
    capacity: int
    healthy: bool = False
    checked: bool = False
    last_check_monotonic: float = 0.0
    last_check_ms: int | None = None
    latency_ms: float | None = None
    health_reason: str = "not checked yet"
    in_flight: int = 0
    routed: int = 0
    failures: int = 0

    def candidate(self) -> Candidate:
        return Candidate(
            executor=self.url,
            healthy=self.healthy,
            in_flight=self.in_flight,
            capacity=self.capacity,
        )


class _HealthAnswer(msgspec.Struct):
    status: str


_health_decoder = msgspec.json.Decoder(_HealthAnswer)


async def probe(
    session: aiohttp.ClientSession, url: str, timeout_s: float
) -> tuple[bool, str, float | None]:
    """``GET <url>/health``: (healthy, reason, latency in ms)."""
    started = time.perf_counter()
    try:
        async with session.get(
            f"{url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            body = await resp.read()
            latency_ms = (time.perf_counter() - started) * 1000
            if resp.status != 200:
                return False, f"health answered HTTP {resp.status}", latency_ms
            try:
                status = _health_decoder.decode(body).status
            except msgspec.DecodeError:
                return False, 'health answer is not {"status": ...} JSON', latency_ms
            if status != "healthy":
                return False, f"health status is {status!r}", latency_ms
            return True, "ok", latency_ms
    except TimeoutError:
        return False, f"no health answer within {timeout_s:g}s", None
    except aiohttp.ClientError as exc:
        return False, f"{type(exc).__name__}: {exc}", None


@dataclass
class ExecutorPool:
    """The executors, their health and their load; ``changed`` wakes waiters."""

    store: EventStore
    session: aiohttp.ClientSession
    urls: tuple[str, ...]
    capacity: int
    health_timeout_s: float = 2.0
    health_stale_s: float = 10.0
    executors: list[ExecutorState] = field(init=False)
    changed: asyncio.Condition = field(init=False, default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.executors = [ExecutorState(url=u, capacity=self.capacity) for u in self.urls]

    def healthy_capacity(self) -> int:
        return sum(x.capacity for x in self.executors if x.healthy)

    def any_healthy(self) -> bool:
        return any(x.healthy for x in self.executors)

    def is_stale(self, x: ExecutorState) -> bool:
        return time.monotonic() - x.last_check_monotonic > self.health_stale_s

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def record_health(
        self, x: ExecutorState, healthy: bool, reason: str, latency_ms: float | None
    ) -> None:
        """Store a check's result; append an event and wake waiters when it flips."""
        flipped = healthy != x.healthy or not x.checked
        x.checked = True
        x.last_check_monotonic = time.monotonic()
        x.last_check_ms = time.time_ns() // 1_000_000
        x.latency_ms = latency_ms
        x.health_reason = reason
        if not flipped:
            return
        x.healthy = healthy
        log.info("executor_health_changed", executor=x.url, healthy=healthy, reason=reason)
        await self.store.append(
            ExecutorHealthChanged(
                executor=x.url, healthy=healthy, reason=reason, latency_ms=latency_ms
            )
        )
        await self.notify()

    async def check(self, x: ExecutorState) -> bool:
        healthy, reason, latency_ms = await probe(self.session, x.url, self.health_timeout_s)
        await self.record_health(x, healthy, reason, latency_ms)
        return healthy

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(x) for x in self.executors))

    async def monitor(self, interval_s: float) -> None:
        """Check every executor every ``interval_s``; one hanging check stalls nothing."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check_all()
