"""The event catalogue: frozen, tagged, versioned msgspec Structs. No I/O here.

Every state change of the worker is one of these, appended to the stream
``{<prefix>}:events`` as flat fields ``type``, ``eval_id``, ``worker_id``,
``ts`` (ms) and ``data`` (the msgspec JSON encoding, which repeats ``type``).
Names are past tense; ``v`` is the schema version of that event type.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Outcome = Literal["completed", "failed"]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every stream event."""

    v: int = 1

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)

    @property
    def eval_id_or_empty(self) -> str:
        return str(getattr(self, "eval_id", None) or "")


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """A task as the Queue Service hands it out (``GET /tasks/next``)."""

    eval_id: str
    code: str
    language: str = "python"
    engine: str = "docker"
    timeout: float | None = None
    priority: int | None = None
    lease_s: float | None = None
    affinity_key: str | None = None
    session_id: str | None = None

    @property
    def routing_key(self) -> str:
        """What the sticky strategy hashes: ``affinity_key``, else ``session_id``, else the id."""
        return self.affinity_key or self.session_id or self.eval_id


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One executor as the balancer saw it when it chose. ``healthy`` is the health
    checks' verdict; an ``ejected`` executor is not routed to either. ``latency_ms``
    is the moving average (EWMA) of its recent ``/execute`` answers, when there were any."""

    executor: str
    healthy: bool
    in_flight: int
    capacity: int
    latency_ms: float | None = None
    ejected: bool = False


# --- lifecycle -------------------------------------------------------------


class WorkerStarted(Event, frozen=True, kw_only=True, tag="worker.started"):
    """A worker process started: its version, executors, strategy and capacity.

    ``discovery`` names where the executors come from (``compose``, ``list``, ``dns``);
    ``queues`` are the queues it pulls from, highest priority first.
    """

    version: str
    executors: list[str]
    strategy: str
    capacity: int
    discovery: str = "compose"
    queues: list[str] = msgspec.field(default_factory=list)


class WorkerStopped(Event, frozen=True, kw_only=True, tag="worker.stopped"):
    """A worker stopped gracefully; ``in_flight`` tasks were left for recovery."""

    reason: str
    in_flight: int


# --- pulling ---------------------------------------------------------------


class PullStarted(Event, frozen=True, kw_only=True, tag="pull.started"):
    """The worker is about to ask the queue for tasks under ``pull_id``.

    Empty polls do not close a pull; ``task.pulled`` or ``task.rejected``
    with the same ``pull_id`` does.
    """

    pull_id: str


class TaskPulled(Event, frozen=True, kw_only=True, tag="task.pulled"):
    """The queue handed us a task (it is now "running" there). Holds the task,
    so a recovery can dispatch it again; ``lease_s`` when the queue leased it;
    ``queue`` is the queue it came from (``None``: ``QUEUE_SERVICE_URL``)."""

    eval_id: str
    pull_id: str
    task: Task
    code_bytes: int
    lease_s: float | None = None
    queue: str | None = None


class PullInterrupted(Event, frozen=True, kw_only=True, tag="pull.interrupted"):
    """Found at start-up: a pull that had no outcome when the worker died.

    The queue may have handed out a task that was never recorded; without a
    lease it stays "running" there. ``queue_running`` is the queue's own count
    of running tasks, when it reports one.
    """

    pull_id: str
    queue_running: int | None = None
    owner: str | None = None  # the worker that had the pull, when another one recovered it


class TaskRejected(Event, frozen=True, kw_only=True, tag="task.rejected"):
    """The queue's answer was not a valid task. ``eval_id`` is set when one was usable;
    ``queue`` is the queue that answered (``None``: ``QUEUE_SERVICE_URL``)."""

    pull_id: str
    eval_id: str | None = None
    reason: str
    excerpt: str
    queue: str | None = None


class QueueUnreachable(Event, frozen=True, kw_only=True, tag="queue.unreachable"):
    """A poll of ``queue`` failed; the worker polls that queue again after ``backoff_s``
    (the other queues are polled meanwhile). ``queue`` ``None``: ``QUEUE_SERVICE_URL``."""

    consecutive_errors: int
    backoff_s: float
    reason: str
    queue: str | None = None


class QueueRecovered(Event, frozen=True, kw_only=True, tag="queue.recovered"):
    """A poll of ``queue`` succeeded after ``after_errors`` failures."""

    after_errors: int
    queue: str | None = None


# --- routing and execution -------------------------------------------------


class ExecutorSelected(Event, frozen=True, kw_only=True, tag="executor.selected"):
    """A routing decision, with every candidate as the strategy saw it and ``why``
    this one won; ``key`` is the hashed key of the ``sticky`` strategy."""

    eval_id: str
    executor: str
    strategy: str
    attempt: int
    candidates: list[Candidate]
    why: str = ""
    key: str | None = None


class TaskDispatched(Event, frozen=True, kw_only=True, tag="task.dispatched"):
    """``POST /execute`` is about to be sent to ``executor``."""

    eval_id: str
    executor: str
    attempt: int
    timeout_s: float


class TaskCompleted(Event, frozen=True, kw_only=True, tag="task.completed"):
    """The executor answered ``status: completed``; ``result`` is its answer;
    ``queue`` is where the task came from (``None``: ``QUEUE_SERVICE_URL``).

    With ``truncated`` the output in ``result`` was cut to ``MAX_OUTPUT_BYTES``;
    the full result is kept under ``{<prefix>}:result:<eval_id>`` for the
    reporter and the publisher.
    """

    eval_id: str
    executor: str
    attempt: int
    result: dict[str, Any]
    duration_ms: float
    truncated: bool = False
    queue: str | None = None


class AttemptFailure(msgspec.Struct, frozen=True, kw_only=True):
    """One failed attempt of a task."""

    attempt: int
    executor: str | None
    reason: str
    error: str


class TaskFailed(Event, frozen=True, kw_only=True, tag="task.failed"):
    """Terminal failure. ``reason`` is a stable code, ``error`` the text sent on;
    ``queue`` is where the task came from (the report goes there)."""

    eval_id: str
    executor: str | None = None
    attempt: int
    reason: str
    error: str
    result: dict[str, Any] | None = None
    duration_ms: float = 0.0
    truncated: bool = False
    attempts: list[AttemptFailure] = msgspec.field(default_factory=list)
    queue: str | None = None


class TaskRetryScheduled(Event, frozen=True, kw_only=True, tag="task.retry_scheduled"):
    """A retryable failure on ``executor``; attempt ``attempt`` follows after ``delay_ms``."""

    eval_id: str
    executor: str
    attempt: int
    delay_ms: float
    reason: str
    error: str


class TaskRecovered(Event, frozen=True, kw_only=True, tag="task.recovered"):
    """Found unfinished at start-up, or taken over from a dead replica (``owner``).
    ``action``: ``redispatch`` (run again as the next attempt), ``fail`` (by
    ``RECOVERY_POLICY``), or ``lease_lost`` (the queue took the task back: it
    will hand it out again)."""

    eval_id: str
    action: Literal["redispatch", "fail", "lease_lost"]
    stage: str
    previous_attempt: int
    owner: str | None = None  # the dead worker it was taken from, on a takeover


class EntryDeadLettered(Event, frozen=True, kw_only=True, tag="entry.dead_lettered"):
    """A projector could not handle an entry ``deliveries`` times; it was moved to
    ``{<prefix>}:dead`` and acknowledged so the projector goes on."""

    projector: str
    entry_id: str
    entry_type: str
    eval_id: str | None = None
    deliveries: int
    error: str


class TaskReported(Event, frozen=True, kw_only=True, tag="task.reported"):
    """The queue acknowledged the outcome (``already`` when it knew it before)."""

    eval_id: str
    outcome: Outcome
    http_status: int
    already: bool = False


class ExecutorHealthChanged(Event, frozen=True, kw_only=True, tag="executor.health_changed"):
    """An executor flipped between healthy and unhealthy (only flips are appended).

    ``checks`` is how many checks in a row agreed (``HEALTHY_THRESHOLD`` /
    ``UNHEALTHY_THRESHOLD``); a refused connection on dispatch flips at once.
    """

    executor: str
    healthy: bool
    reason: str
    latency_ms: float | None = None
    checks: int = 1


class ExecutorEjected(Event, frozen=True, kw_only=True, tag="executor.ejected"):
    """Passive ejection: ``consecutive_failures`` retryable dispatch failures in a row.

    No task is routed to the executor for ``ejection_s`` (``EJECT_BASE_S`` doubled
    for each earlier ejection in ``ejections``, capped at ``EJECT_MAX_S``); it
    rejoins after a passed health check once that time is over.
    """

    executor: str
    consecutive_failures: int
    ejection_s: float
    ejections: int
    reason: str


class ExecutorRejoined(Event, frozen=True, kw_only=True, tag="executor.rejoined"):
    """An ejected executor passed a health check after its ejection time: routable again."""

    executor: str
    ejected_s: float
    reason: str


class ExecutorAdded(Event, frozen=True, kw_only=True, tag="executor.added"):
    """Discovery found a new executor (``provider``: ``dns``, ``list`` or ``compose``)."""

    executor: str
    provider: str
    capacity: int


class ExecutorRemoved(Event, frozen=True, kw_only=True, tag="executor.removed"):
    """Discovery no longer lists the executor. No new task goes there; the
    ``in_flight`` tasks it still runs finish normally."""

    executor: str
    provider: str
    in_flight: int


class ExecutorCapacityChanged(Event, frozen=True, kw_only=True, tag="executor.capacity_changed"):
    """The executor's capacity changed: learned from its ``GET /health`` answer
    (``LEARN_CAPACITY``); ``previous`` is the capacity used until now."""

    executor: str
    capacity: int
    previous: int
    source: str


AnyEvent = (
    WorkerStarted
    | WorkerStopped
    | PullStarted
    | PullInterrupted
    | TaskRetryScheduled
    | TaskRecovered
    | EntryDeadLettered
    | TaskPulled
    | TaskRejected
    | QueueUnreachable
    | QueueRecovered
    | ExecutorSelected
    | TaskDispatched
    | TaskCompleted
    | TaskFailed
    | TaskReported
    | ExecutorHealthChanged
    | ExecutorEjected
    | ExecutorRejoined
    | ExecutorAdded
    | ExecutorRemoved
    | ExecutorCapacityChanged
)

EVENT_TYPES: tuple[type[Event], ...] = (
    WorkerStarted,
    WorkerStopped,
    PullStarted,
    PullInterrupted,
    TaskPulled,
    TaskRejected,
    QueueUnreachable,
    QueueRecovered,
    ExecutorSelected,
    TaskDispatched,
    TaskCompleted,
    TaskFailed,
    TaskRetryScheduled,
    TaskRecovered,
    TaskReported,
    ExecutorHealthChanged,
    ExecutorEjected,
    ExecutorRejoined,
    ExecutorAdded,
    ExecutorRemoved,
    ExecutorCapacityChanged,
    EntryDeadLettered,
)

TERMINAL_TYPES = frozenset({"task.completed", "task.failed"})


class Entry(msgspec.Struct, frozen=True):
    """One stream entry: its id, who wrote it, when, and the event."""

    id: str
    worker_id: str
    ts: int
    event: AnyEvent


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> AnyEvent:
    """Decode an event's ``data`` field; raises ``msgspec.DecodeError`` on anything else."""
    event: AnyEvent = _decoder.decode(data)
    return event


def event_type_names() -> list[str]:
    return [str(cls.__struct_config__.tag) for cls in EVENT_TYPES]
