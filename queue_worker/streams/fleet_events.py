"""Events about the workers and the executors, not about one task (see ``events.py``)."""

from __future__ import annotations

import msgspec

from queue_worker.streams.event_base import Event

# --- lifecycle -------------------------------------------------------------


class WorkerStarted(Event, frozen=True, kw_only=True, tag="worker.started"):
    """A worker process started: its version, executors, strategy and capacity.

    ``discovery`` names where the executors come from (``compose``, ``list``, ``dns``);
    ``queues`` are the queues it pulls from, highest priority first. ``stream_format``
    is the stream format it reads and writes (``STREAM_FORMAT``); the earlier version
    (0.1.x) did not write it, and its entries read as format 1. A worker that sees a live
    worker of another format start stops pulling until it is gone (``router/formats.py``).
    """

    version: str
    executors: list[str]
    strategy: str
    capacity: int
    discovery: str = "compose"
    queues: list[str] = msgspec.field(default_factory=list)
    stream_format: int = 1


class WorkerStopped(Event, frozen=True, kw_only=True, tag="worker.stopped"):
    """A worker stopped gracefully; ``in_flight`` tasks were left for recovery."""

    reason: str
    in_flight: int


class WorkerFenced(Event, frozen=True, kw_only=True, tag="worker.fenced"):
    """A replica took over ``owner``, whose liveness key had expired: from now on no
    entry of ``owner``'s ``generation`` (or older) is accepted by the stream, so a
    worker that was only slow, not dead, cannot act on tasks now recovered elsewhere.
    Written by the replica that won the takeover, before it recovers anything."""

    owner: str
    generation: int


class LoopCrashed(Event, frozen=True, kw_only=True, tag="loop.crashed"):
    """A background loop of the process (``loop``: ``pull``, ``publisher``,
    ``health:<executor>``, ...) raised an unexpected error. It was restarted after a
    backoff, unless ``gave_up``: it failed too often, the worker stopped pulling and
    exits so that its orchestrator restarts it."""

    loop: str
    error: str
    restarts: int
    gave_up: bool = False


class StreamReset(Event, frozen=True, kw_only=True, tag="stream.reset"):
    """Redis lost data this worker had written: the stream vanished, Redis came back
    empty (its ``{<prefix>}:epoch`` key is gone) or the stream's last id is below one
    this worker appended (a failover to a replica that missed writes). The worker
    recreated the consumer groups where needed and re-recorded, after this entry,
    the tasks it has in flight (``task.restored``) and the outcomes it had recorded
    that were lost before the queue acknowledged them (``restored`` terminal events)."""

    reason: str
    last_seen_id: str | None = None
    stream_last_id: str | None = None
    restored_tasks: int = 0
    restored_outcomes: int = 0


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


class ExecutorThrottled(Event, frozen=True, kw_only=True, tag="executor.throttled"):
    """Back-pressure: the executor answered ``eval_id``'s ``/execute`` with 429 or 503.

    The task was not run. The executor gets no task for ``cooldown_s`` (its
    ``Retry-After``, ``retry_after_s`` when it sent one, bounded; 1 s without), and the
    task is routed again without spending an attempt.
    """

    executor: str
    eval_id: str
    http_status: int | None = None
    retry_after_s: float | None = None
    cooldown_s: float


FLEET = "fleet"  # the scope of a pause that holds every worker


class ControlPaused(Event, frozen=True, kw_only=True, tag="control.paused"):
    """An operator paused pulling: for every worker (``scope`` ``fleet``) or the worker
    named by ``scope``. Tasks in flight finish; nothing more is pulled until a
    ``control.resumed`` of the same scope. ``by`` is who acted (the admin token's name,
    or ``cli:<user>``), ``reason`` why."""

    scope: str
    by: str
    reason: str


class ControlResumed(Event, frozen=True, kw_only=True, tag="control.resumed"):
    """An operator lifted the pause of ``scope``."""

    scope: str
    by: str
    reason: str


class ExecutorDrained(Event, frozen=True, kw_only=True, tag="executor.drained"):
    """An operator drained the executor: no worker sends it a new task; those it runs
    finish. It lasts until ``executor.undrained``, across restarts."""

    executor: str
    by: str
    reason: str


class ExecutorUndrained(Event, frozen=True, kw_only=True, tag="executor.undrained"):
    """An operator ended the executor's drain: it takes tasks again."""

    executor: str
    by: str
    reason: str


class CheckpointIgnored(Event, frozen=True, kw_only=True, tag="checkpoint.ignored"):
    """At start-up the stored checkpoint of the status view (``checkpoint_id``, when it
    could be read) was not used, for ``reason`` (another schema version, undecodable,
    past the stream's end); the stream was folded in full instead."""

    reason: str
    checkpoint_id: str | None = None


class RoutingPanicEntered(Event, frozen=True, kw_only=True, tag="routing.panic_entered"):
    """Only ``healthy`` of the ``executors`` this worker has checked are healthy and not
    ejected, below ``threshold_percent`` (``PANIC_THRESHOLD``): until it leaves panic,
    it routes across every executor whatever its health."""

    healthy: int
    executors: int
    threshold_percent: float


class RoutingPanicLeft(Event, frozen=True, kw_only=True, tag="routing.panic_left"):
    """The healthy share is back at ``threshold_percent`` or above (or the executors
    changed): routing follows the health checks again, after ``lasted_s`` in panic."""

    healthy: int
    executors: int
    threshold_percent: float
    lasted_s: float


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
