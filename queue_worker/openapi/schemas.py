"""Response bodies of our own API, as msgspec Structs (also the OpenAPI schemas)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from queue_worker.streams.views import Counters


class ExecutorHealth(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    healthy: bool
    reason: str


class HealthResponse(msgspec.Struct, frozen=True, kw_only=True):
    """``healthy``: Redis takes writes and every executor is healthy. ``degraded``
    otherwise; the HTTP status is 503 when the worker cannot make progress
    (Redis unreachable or refusing writes, no healthy executor, fenced, taken
    over, or a background loop that kept failing), and ``reasons`` says why.
    ``loops_dead`` lists the loops given up on; ``loop_restarts`` how often each
    loop was restarted after a crash."""

    status: Literal["healthy", "degraded"]
    worker_id: str
    redis: bool
    queue_reachable: bool
    executors_healthy: int
    executors_total: int
    loops_dead: list[str]
    executors: list[ExecutorHealth]
    reasons: list[str] = msgspec.field(default_factory=list)
    loop_restarts: dict[str, int] = msgspec.field(default_factory=dict)


class HealthStatus(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /health`` as a caller without read access sees it (with a token configured,
    one that sent none): the verdict alone; the HTTP status is the same."""

    status: Literal["healthy", "degraded"]


class LivenessResponse(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /health/live``: ``alive`` (200) while the process makes progress;
    ``failing`` (503, with the reason) once a loop kept failing or a peer took
    this worker over: the process is stopping, and an orchestrator should
    restart it. The reason is told to callers with read access only."""

    status: Literal["alive", "failing"]
    reason: str | None = None


class LiveCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Counters kept by this process only (not state changes, so not in the stream)."""

    polls: int
    empty_polls: int
    published: int
    report_errors: int
    events_appended: int
    append_round_trips: int
    quarantined: int = 0
    wakeups: int = 0
    long_polls: int = 0
    generation: int = 0
    # The status view: this process's entries folded as written, folded in their place
    # after another writer's (parked), and entries decoded from a read of the stream.
    folded_as_written: int = 0
    folded_parked: int = 0
    read_back: int = 0


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
    ejected: bool = False
    throttles: int = 0  # 429/503 answers (executor.throttled)
    cooling_s: float | None = None  # how long it still cools down after the last one
    warmth: float | None = None  # while warming up (SLOW_START_S): its share, 0 to 1
    drained: bool = False  # by an operator: no new task goes to it


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
    panic: bool = False  # routing across every executor (PANIC_THRESHOLD)
    paused: PauseStatus | None = None  # pulling paused by an operator (POST /admin/pause)
    counters: Counters
    live: LiveCounters
    queue: QueueStatus
    executors: list[ExecutorStatus]
    stream: StreamStatus
    fleet: list[FleetMember]


class TaskEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the stream about a task."""

    id: str
    ts: int  # unix ms, as its writer saw it
    worker_id: str
    # A StreamEvent as JSON; task code, executor output and error texts are
    # {"redacted": true, "bytes", "sha256"} unless an admin asked for payloads=1.
    event: dict[str, Any]


class TaskHistory(msgspec.Struct, frozen=True, kw_only=True):
    eval_id: str
    state: str | None  # waiting, in_flight, completed or failed (None: not indexed yet)
    executor: str | None  # the executor of its latest step, when it names one
    entries: list[TaskEntry]


class TaskStateRow(msgspec.Struct, frozen=True, kw_only=True):
    eval_id: str
    state: str
    executor: str | None
    since_ms: int | None  # when it entered the state


class TaskList(msgspec.Struct, frozen=True, kw_only=True):
    state: str
    tasks: list[TaskStateRow]
    next_cursor: str | None  # pass as cursor= for the next page; None: no more


Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class PauseRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Reason  # why: recorded in the event
    worker: Annotated[str, msgspec.Meta(min_length=1, max_length=253)] | None = None  # else all


class DrainRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    executor: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]  # its URL
    reason: Reason


class ActionRecorded(msgspec.Struct, frozen=True, kw_only=True):
    action: str  # pause, resume, drain, undrain
    scope: str  # "fleet", a worker id, or an executor URL
    by: str  # who acted: the admin token's name
    entry_id: str  # the stream entry that records it


class TaskActionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Reason  # why: recorded in the event


class RetryRecorded(msgspec.Struct, frozen=True, kw_only=True):
    action: str  # retry
    scope: str  # the evaluation retried
    by: str  # who acted: the admin token's name
    entry_id: str  # the stream entry that records it (task.retry_requested)
    new_eval_id: str  # the evaluation the queue runs again: <eval_id>-retry-<n>
    queue: str  # the queue it was enqueued at


class PauseStatus(msgspec.Struct, frozen=True, kw_only=True):
    scope: str  # "fleet" or this worker's id
    by: str
    reason: str
    since_ms: int


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    error: str
    status: int
    detail: str | None = None


class TicketResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A single-use ticket for ``GET /events/stream?ticket=``, valid ``expires_in_s``."""

    ticket: str
    expires_in_s: float
