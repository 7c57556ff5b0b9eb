"""One executor as this process knows it: health, load, latency, ejection, cool-down.

An :class:`ExecutorState` is held by the pool (:mod:`queue_worker.router.executors`)
for each member, and by the tasks running on it even after it is removed. It says
whether a strategy may pick the executor now (:attr:`ExecutorState.pickable`), the
snapshot a strategy decides on and the candidate ``executor.selected`` records; it
counts the checks that flip its health and the latency of its ``/execute`` answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from queue_worker.router.balancer import Snapshot
from queue_worker.streams.events import Candidate, ExecutorRejoined

log = structlog.get_logger(__name__)

LATENCY_EWMA_ALPHA = 0.3  # weight of the newest /execute duration in the moving average
# A latency figure not refreshed for this long is dropped: the executor counts as "no
# figure" again and gets tried, so one slow spell does not keep it idle for ever.
LATENCY_STALE_S = 10.0


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
    cooled_until: float = 0.0  # monotonic: throttled (429/503) until then
    throttles: int = 0
    in_panic: bool = False  # the pool is in panic: routable whatever its health
    warm_from: float = 0.0  # monotonic: warming up (slow start) from then ...
    warm_until: float = 0.0  # ... until then
    warm_on_first_check: bool = False  # added at runtime: its first pass warms it up
    drained: bool = False  # an operator drained it: no new task (router/control.py)

    def __post_init__(self) -> None:
        self.configured_capacity = self.configured_capacity or self.capacity

    @property
    def fit(self) -> bool:
        """Healthy by its checks, not ejected and still a member."""
        return self.healthy and not self.ejected and not self.removed

    @property
    def routable(self) -> bool:
        """Fit, or any member while the pool is in panic: a strategy may pick it."""
        return self.fit or (self.in_panic and not self.removed)

    def warmth(self, now: float | None = None) -> float:
        """How far its slow start has come: 1.0 when it is not warming up."""
        if not self.warm_until:
            return 1.0
        now = time.monotonic() if now is None else now
        if now >= self.warm_until:
            self.warm_from = self.warm_until = 0.0
            return 1.0
        return max(now - self.warm_from, 0.0) / (self.warm_until - self.warm_from)

    def warm_up(self, seconds: float, now: float) -> None:
        """Start a slow start of ``seconds`` (none when 0)."""
        if seconds > 0:
            self.warm_from, self.warm_until = now, now + seconds

    def cooling_s(self, now: float | None = None) -> float:
        """How long this executor still cools down after a throttle (0: it does not)."""
        if not self.cooled_until:
            return 0.0
        return max(self.cooled_until - (time.monotonic() if now is None else now), 0.0)

    @property
    def pickable(self) -> bool:
        """Routable, not drained and not cooling down: a strategy may pick it now."""
        return self.routable and not self.drained and not self.cooling_s()

    def routing_latency_ms(self) -> float | None:
        """The latency EWMA, unless it is older than ``LATENCY_STALE_S``."""
        if time.monotonic() - self.latency_observed > LATENCY_STALE_S:
            return None
        return self.latency_ewma_ms

    def snapshot(self) -> Snapshot:
        return Snapshot(
            url=self.url,
            healthy=self.pickable,
            in_flight=max(self.in_flight, self.fleet_in_flight),
            capacity=self.capacity,
            latency_ms=self.routing_latency_ms(),
        )

    def candidate(self) -> Candidate:
        ewma = self.routing_latency_ms()
        cooling = self.cooling_s()
        warmth = self.warmth()
        return Candidate(
            executor=self.url,
            healthy=self.healthy,
            in_flight=self.in_flight,
            capacity=self.capacity,
            latency_ms=None if ewma is None else round(ewma, 1),
            ejected=self.ejected,
            cooling_s=round(cooling, 3) if cooling else None,
            warmth=min(round(warmth, 3), 0.999) if warmth < 1 else None,
            drained=self.drained,
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

    def count_check(
        self, healthy: bool, at_once: bool, healthy_threshold: int, unhealthy_threshold: int
    ) -> int | None:
        """Count a check; when it flips this executor's health (``healthy_threshold``
        passes or ``unhealthy_threshold`` failures in a row, or ``at_once``), how many
        checks in a row agreed."""
        if healthy:
            self.passes_in_row, self.fails_in_row = self.passes_in_row + 1, 0
        else:
            self.passes_in_row, self.fails_in_row = 0, self.fails_in_row + 1
        first, self.checked = not self.checked, True
        if first:
            return 1  # the first check decides at once (and counts as a flip from unknown)
        if healthy == self.healthy:
            return None
        if healthy:
            return self.passes_in_row if self.passes_in_row >= healthy_threshold else None
        if at_once:
            return 1
        return self.fails_in_row if self.fails_in_row >= unhealthy_threshold else None

    def rejoin(self, now: float, reason: str) -> ExecutorRejoined:
        """Its ejection is over and a check passed: routable again."""
        self.ejected = False
        self.last_ejection_end = now
        ejected_s = round(now - self.ejected_at, 3)
        log.info("executor_rejoined", executor=self.url, ejected_s=ejected_s)
        return ExecutorRejoined(
            executor=self.url,
            ejected_s=ejected_s,
            reason=f"health check passed after the ejection ({reason})",
        )
