"""What every stream event shares, and the values events carry (a task, a candidate).

The catalogue itself is in ``events.py`` (tasks and pulls) and ``fleet_events.py``
(workers and executors); ``events.py`` names every type.
"""

from __future__ import annotations

from typing import Literal

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
    # Unix seconds: not dispatched after it (the task's own, or TASK_DEADLINE_S from its
    # pull, whichever is earlier; task.pulled records the one applied).
    deadline: float | None = None
    # W3C Trace Context, set at the pull: ``trace_id`` is the trace of this evaluation
    # (the one ``traceparent`` names, else a new one); ``traceparent`` and ``tracestate``
    # are what the queue or the gateway sent, when valid (``streams/tracecontext.py``).
    trace_id: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def routing_key(self) -> str:
        """What the sticky strategy hashes: ``affinity_key``, else ``session_id``, else the id."""
        return self.affinity_key or self.session_id or self.eval_id


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One executor as the balancer saw it when it chose. ``healthy`` is the health
    checks' verdict; an ``ejected`` executor is not routed to either. ``latency_ms``
    is the moving average (EWMA) of its recent ``/execute`` answers, when there were any;
    ``cooling_s`` how long it still cooled down after a throttle (429/503), when it did;
    ``warmth`` how far its slow start had come (0 to 1), while it was warming up;
    ``drained`` whether an operator had drained it (no new task goes there)."""

    executor: str
    healthy: bool
    in_flight: int
    capacity: int
    latency_ms: float | None = None
    ejected: bool = False
    cooling_s: float | None = None
    warmth: float | None = None
    drained: bool = False


class AttemptFailure(msgspec.Struct, frozen=True, kw_only=True):
    """One failed attempt of a task."""

    attempt: int
    executor: str | None
    reason: str
    error: str
