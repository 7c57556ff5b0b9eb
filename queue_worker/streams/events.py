"""The event catalogue: frozen, tagged, versioned msgspec Structs. No I/O here.

This module names every event type (``AnyEvent``, ``EVENT_TYPES``) and holds the
events of pulls and tasks; those about workers and executors are in
``fleet_events.py``, what they share in ``event_base.py``. Import them from here.

Every state change of the worker is one of these, appended to the stream
``{<prefix>}:events`` as flat fields ``type``, ``eval_id``, ``worker_id``,
``ts`` (ms) and ``data`` (the msgspec JSON encoding, which repeats ``type``).
Names are past tense; ``v`` is the schema version of that event type.

Every event of a task carries the task's ``trace_id`` (W3C Trace Context: the trace the
queue or the gateway started, else one started at the pull), when the worker recording it
knows it; ``None`` in entries written before it was recorded.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from queue_worker.streams.event_base import AttemptFailure, Candidate, Event, Outcome, Task
from queue_worker.streams.fleet_events import (
    FLEET,
    CheckpointIgnored,
    ControlPaused,
    ControlResumed,
    ExecutorAdded,
    ExecutorCapacityChanged,
    ExecutorDrained,
    ExecutorEjected,
    ExecutorHealthChanged,
    ExecutorRejoined,
    ExecutorRemoved,
    ExecutorThrottled,
    ExecutorUndrained,
    LoopCrashed,
    RoutingPanicEntered,
    RoutingPanicLeft,
    StreamReset,
    WorkerFenced,
    WorkerStarted,
    WorkerStopped,
)

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
    trace_id: str | None = None  # the task's trace (W3C trace id)
    # Why the task's traceparent was ignored (invalid): a new trace was started instead.
    trace_ignored: str | None = None


class PullClosed(Event, frozen=True, kw_only=True, tag="pull.closed"):
    """A pull that got no task is closed without one (a clean stop): the queue
    handed nothing out under ``pull_id``, so recovery has nothing to look for."""

    pull_id: str
    reason: str


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
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskDuplicateHandout(Event, frozen=True, kw_only=True, tag="task.duplicate_handout"):
    """The queue handed out a task that is already in flight in the fleet (its lease
    ran out while it still runs, say). It is not executed again: the running attempt's
    outcome is the one reported. ``holder`` is the worker (and generation) running it.
    Closes the pull ``pull_id`` like ``task.pulled``."""

    eval_id: str
    pull_id: str
    holder: str
    lease_s: float | None = None
    queue: str | None = None
    trace_id: str | None = None  # the task's trace (W3C trace id)


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
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskDispatched(Event, frozen=True, kw_only=True, tag="task.dispatched"):
    """``POST /execute`` is about to be sent to ``executor``."""

    eval_id: str
    executor: str
    attempt: int
    timeout_s: float
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskCompleted(Event, frozen=True, kw_only=True, tag="task.completed"):
    """The executor answered ``status: completed``; ``result`` is its answer;
    ``queue`` is where the task came from (``None``: ``QUEUE_SERVICE_URL``).

    With ``truncated`` the output in ``result`` was cut to ``MAX_OUTPUT_BYTES``;
    the full result is kept under ``{<prefix>}:result:<eval_id>`` for the
    reporter and the publisher.

    ``restored``: re-recorded after a ``stream.reset`` (the first entry was lost);
    ``published``: its pub/sub message had gone out before, so it is not sent again.
    """

    eval_id: str
    executor: str
    attempt: int
    result: dict[str, Any]
    duration_ms: float
    truncated: bool = False
    queue: str | None = None
    restored: bool = False
    published: bool = False
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskFailed(Event, frozen=True, kw_only=True, tag="task.failed"):
    """Terminal failure. ``reason`` is a stable code, ``error`` the text sent on;
    ``queue`` is where the task came from (the report goes there). ``restored`` and
    ``published`` as for ``task.completed``."""

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
    restored: bool = False
    published: bool = False
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskRetryScheduled(Event, frozen=True, kw_only=True, tag="task.retry_scheduled"):
    """A retryable failure on ``executor``; attempt ``attempt`` follows after ``delay_ms``."""

    eval_id: str
    executor: str
    attempt: int
    delay_ms: float
    reason: str
    error: str
    trace_id: str | None = None  # the task's trace (W3C trace id)


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
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskRestored(Event, frozen=True, kw_only=True, tag="task.restored"):
    """Re-recorded after a ``stream.reset``: a task in flight in this worker whose
    earlier entries Redis lost. It holds the task, like ``task.pulled``, so that a
    later recovery can run it again; ``stage``, ``executor`` and ``attempt`` say
    where it was."""

    eval_id: str
    task: Task
    stage: str
    executor: str | None = None
    attempt: int = 0
    lease_s: float | None = None
    queue: str | None = None
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskLeaseLost(Event, frozen=True, kw_only=True, tag="task.lease_lost"):
    """Renewing the task's lease answered 404 while the task still runs here: the
    queue may hand it out again. A second pull of it anywhere in the fleet is then
    recorded as ``task.duplicate_handout`` and not executed."""

    eval_id: str
    queue: str | None = None
    trace_id: str | None = None  # the task's trace (W3C trace id)


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
    trace_id: str | None = None  # the task's trace (W3C trace id)


# --- operators' actions on one task ------------------------------------------


class TaskCancelRequested(Event, frozen=True, kw_only=True, tag="task.cancel_requested"):
    """An operator asked to cancel a task this fleet holds (``by``: the admin token's name
    or ``cli:<login>``; ``reason``: why). Any replica may record it; the one holding the
    task folds it from the stream and acts (``task.cancelled``)."""

    eval_id: str
    by: str
    reason: str
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskCancelled(Event, frozen=True, kw_only=True, tag="task.cancelled"):
    """The worker holding the task cancelled it, at ``stage`` (``waiting``, ``dispatched``,
    ``retrying``...): it is not dispatched again and ends as ``task.failed`` with reason
    ``cancelled``. ``executor_cancel`` says what the executor running it answered to
    ``POST /execute/{eval_id}/cancel``: ``accepted``, ``unsupported`` (404/405: it runs to
    its end, and its late answer is recorded as ``task.answer_discarded``), ``refused``
    or ``unreachable`` (with detail); ``None`` when it was not running anywhere."""

    eval_id: str
    by: str
    reason: str
    stage: str
    executor: str | None = None
    attempt: int = 0
    executor_cancel: str | None = None
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskAnswerDiscarded(Event, frozen=True, kw_only=True, tag="task.answer_discarded"):
    """The answer of an attempt that came after its task was cancelled: not reported,
    only recorded. ``outcome`` is ``completed`` or the failure's reason code."""

    eval_id: str
    executor: str
    attempt: int
    outcome: str
    error: str | None = None
    duration_ms: float = 0.0
    trace_id: str | None = None  # the task's trace (W3C trace id)


class TaskRetryRequested(Event, frozen=True, kw_only=True, tag="task.retry_requested"):
    """An operator had a finished task run again: the task of its ``task.pulled`` was
    enqueued at ``queue`` as ``new_eval_id`` (the queue refuses an ``eval_id`` it knows,
    so a retry is a new evaluation: ``<eval_id>-retry-<n>``)."""

    eval_id: str
    by: str
    reason: str
    new_eval_id: str
    queue: str
    trace_id: str | None = None  # the task's trace (W3C trace id)


AnyEvent = (
    WorkerStarted
    | WorkerStopped
    | WorkerFenced
    | LoopCrashed
    | StreamReset
    | PullStarted
    | PullClosed
    | PullInterrupted
    | TaskDuplicateHandout
    | TaskRestored
    | TaskLeaseLost
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
    | ExecutorThrottled
    | ExecutorAdded
    | ExecutorRemoved
    | ExecutorCapacityChanged
    | RoutingPanicEntered
    | RoutingPanicLeft
    | ControlPaused
    | ControlResumed
    | ExecutorDrained
    | ExecutorUndrained
    | CheckpointIgnored
    | TaskCancelRequested
    | TaskCancelled
    | TaskAnswerDiscarded
    | TaskRetryRequested
)

EVENT_TYPES: tuple[type[Event], ...] = (
    WorkerStarted,
    WorkerStopped,
    WorkerFenced,
    LoopCrashed,
    StreamReset,
    PullStarted,
    PullClosed,
    PullInterrupted,
    TaskPulled,
    TaskDuplicateHandout,
    TaskRejected,
    QueueUnreachable,
    QueueRecovered,
    ExecutorSelected,
    TaskDispatched,
    TaskCompleted,
    TaskFailed,
    TaskRetryScheduled,
    TaskRecovered,
    TaskRestored,
    TaskLeaseLost,
    TaskReported,
    ExecutorHealthChanged,
    ExecutorEjected,
    ExecutorRejoined,
    ExecutorThrottled,
    ExecutorAdded,
    ExecutorRemoved,
    ExecutorCapacityChanged,
    RoutingPanicEntered,
    RoutingPanicLeft,
    ControlPaused,
    ControlResumed,
    ExecutorDrained,
    ExecutorUndrained,
    CheckpointIgnored,
    TaskCancelRequested,
    TaskCancelled,
    TaskAnswerDiscarded,
    TaskRetryRequested,
    EntryDeadLettered,
)

TERMINAL_TYPES = frozenset({"task.completed", "task.failed"})
# The entries that carry an outcome to tell the platform (as the stream's ``type`` field).
OUTCOME_TYPES = frozenset({b"task.completed", b"task.failed", b"task.rejected"})


class Entry(msgspec.Struct, frozen=True):
    """One stream entry: its id, who wrote it (worker and its generation), when, and
    the event."""

    id: str
    worker_id: str
    ts: int
    event: AnyEvent
    gen: int = 0


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


__all__ = [
    "FLEET",
    "OUTCOME_TYPES",
    "TERMINAL_TYPES",
    "AnyEvent",
    "AttemptFailure",
    "Candidate",
    "CheckpointIgnored",
    "ControlPaused",
    "ControlResumed",
    "Entry",
    "EntryDeadLettered",
    "Event",
    "ExecutorAdded",
    "ExecutorCapacityChanged",
    "ExecutorDrained",
    "ExecutorEjected",
    "ExecutorHealthChanged",
    "ExecutorRejoined",
    "ExecutorRemoved",
    "ExecutorSelected",
    "ExecutorThrottled",
    "ExecutorUndrained",
    "LoopCrashed",
    "Outcome",
    "PullClosed",
    "PullInterrupted",
    "PullStarted",
    "QueueRecovered",
    "QueueUnreachable",
    "RoutingPanicEntered",
    "RoutingPanicLeft",
    "StreamReset",
    "Task",
    "TaskAnswerDiscarded",
    "TaskCancelRequested",
    "TaskCancelled",
    "TaskCompleted",
    "TaskDispatched",
    "TaskDuplicateHandout",
    "TaskFailed",
    "TaskLeaseLost",
    "TaskPulled",
    "TaskRecovered",
    "TaskRejected",
    "TaskReported",
    "TaskRestored",
    "TaskRetryRequested",
    "TaskRetryScheduled",
    "WorkerFenced",
    "WorkerStarted",
    "WorkerStopped",
    "decode_event",
    "encode_event",
    "event_type_names",
]
