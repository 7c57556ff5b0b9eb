"""Response bodies of our own API, as msgspec Structs (also the OpenAPI schemas)."""

from __future__ import annotations

from typing import Literal

import msgspec

from queue_worker.streams.views import Counters


class ExecutorHealth(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    healthy: bool
    reason: str


class HealthResponse(msgspec.Struct, frozen=True, kw_only=True):
    """``healthy``: Redis reachable and every executor healthy. ``degraded``
    otherwise; the HTTP status is 503 when the worker cannot make progress
    (Redis unreachable, no healthy executor, or a background loop died)."""

    status: Literal["healthy", "degraded"]
    worker_id: str
    redis: bool
    queue_reachable: bool
    executors_healthy: int
    executors_total: int
    loops_dead: list[str]
    executors: list[ExecutorHealth]


class LiveCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Counters kept by this process only (not state changes, so not in the stream)."""

    polls: int
    empty_polls: int
    published: int
    report_errors: int
    events_appended: int
    append_round_trips: int


class ExecutorStatus(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    healthy: bool
    health_reason: str
    last_check_ms: int | None
    latency_ms: float | None
    capacity: int
    in_flight: int
    routed: int
    completed: int
    failed: int


class ProjectorStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    last_id: str | None
    pending: int | None = None
    lag: int | None = None


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    length: int | None
    last_id: str | None
    projectors: list[ProjectorStatus]


class QueueStatus(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    reachable: bool
    consecutive_errors: int


class FleetMember(msgspec.Struct, frozen=True, kw_only=True):
    """A worker that wrote to this deployment's stream, folded from it."""

    worker_id: str
    alive: bool  # its liveness key exists (it refreshes it while it runs)
    running: bool  # started and not stopped, as the stream says
    in_flight: int  # its tasks pulled and not yet terminal
    counters: Counters


class StatusResponse(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    version: str
    strategy: str
    uptime_s: float
    in_flight: int  # pulled and not yet terminal: on an executor, or waiting for a slot
    waiting: int  # of those, waiting for a free executor slot (see PULL_AHEAD)
    routed_last_minute: int
    counters: Counters
    live: LiveCounters
    queue: QueueStatus
    executors: list[ExecutorStatus]
    stream: StreamStatus
    fleet: list[FleetMember]


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    error: str
    status: int
    detail: str | None = None
