"""A task's spans, built from its recorded events. Pure: no I/O, no clock.

When a task ends, the span projector (``streams/tracing.py``) reads its entries (found
in the task index), summarizes each (:func:`summarize`, :class:`Step`) and turns them
into spans (:func:`build`). Every span id is derived from the evaluation and a stream entry
(``tracecontext.span_id``), every time from a recorded ``ts``: the same entries give the
same spans, in whichever replica and however often they are built.

The tree (see the README's Tracing section)::

    evaluation                       task.pulled .. task.reported (or the task's end)
    ├── wait for slot                task.pulled / backoff end / recovery .. executor.selected
    ├── dispatch                     task.dispatched .. its outcome (one per POST /execute)
    ├── retry backoff                task.retry_scheduled .. + delay_ms
    ├── recovery                     the task's last entry before .. task.recovered
    └── report                       task.completed / task.failed .. task.reported

The publish of the outcome (pub/sub) leaves no entry in the stream: it has no span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from queue_worker.streams import events as ev
from queue_worker.streams.entries import id_key
from queue_worker.streams.tracecontext import (
    InvalidTraceparent,
    parse_traceparent,
    root_span_id,
    span_id,
)

ATTRIBUTE_MAX_CHARS = 256  # a longer text attribute is cut here
MS = 1_000_000  # nanoseconds in a millisecond

# The entry types a task's spans are built from (the stream's ``type`` field).
TRACED_TYPES = frozenset(
    t.encode()
    for t in (
        "task.pulled",
        "executor.selected",
        "task.dispatched",
        "task.retry_scheduled",
        "task.recovered",
        "task.restored",
        "task.completed",
        "task.failed",
        "task.cancelled",
        "task.answer_discarded",
        "task.lease_lost",
        "task.reported",
    )
)


class Step(msgspec.Struct, frozen=True):
    """One entry of a task, as much of it as its spans need. Built from the entry alone,
    so the same entry always gives the same step."""

    id: str
    ts: int  # ms
    type: str
    worker: str
    trace_id: str | None
    attrs: dict[str, Any]


def _cut(value: object) -> Any:
    if isinstance(value, str) and len(value) > ATTRIBUTE_MAX_CHARS:
        return value[:ATTRIBUTE_MAX_CHARS]
    return value


def _attrs(event: object, names: tuple[str, ...]) -> dict[str, Any]:
    found = {}
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            found[name] = _cut(value)
    return found


def summarize(entry: ev.Entry) -> Step | None:
    """The :class:`Step` of ``entry``; ``None`` when it is not a traced entry of a task."""
    event = entry.event
    eval_id = event.eval_id_or_empty
    if not eval_id or event.type.encode() not in TRACED_TYPES:
        return None
    attrs: dict[str, Any]
    match event:
        case ev.TaskPulled():
            task = event.task
            attrs = _attrs(event, ("queue", "code_bytes", "lease_s", "trace_ignored"))
            attrs |= _attrs(task, ("language", "engine", "priority", "traceparent"))
        case ev.ExecutorSelected():
            attrs = _attrs(event, ("executor", "attempt", "strategy", "why", "key"))
            attrs["candidates"] = len(event.candidates)
        case ev.TaskDispatched():
            attrs = _attrs(event, ("executor", "attempt", "timeout_s"))
        case ev.TaskRetryScheduled():
            attrs = _attrs(event, ("executor", "attempt", "delay_ms", "reason"))
        case ev.TaskRecovered():
            attrs = _attrs(event, ("action", "stage", "previous_attempt", "owner"))
        case ev.TaskRestored():
            attrs = _attrs(event, ("stage", "executor", "attempt"))
        case ev.TaskCompleted():
            attrs = _attrs(event, ("executor", "attempt", "duration_ms"))
        case ev.TaskFailed():
            attrs = _attrs(event, ("executor", "attempt", "reason", "duration_ms"))
        case ev.TaskCancelled():
            attrs = _attrs(event, ("by", "stage", "executor_cancel"))
        case ev.TaskAnswerDiscarded():
            attrs = _attrs(event, ("executor", "attempt", "outcome"))
        case ev.TaskReported():
            attrs = _attrs(event, ("outcome", "http_status", "already"))
        case _:
            attrs = {}
    trace_id = getattr(event, "trace_id", None)
    if isinstance(event, ev.TaskPulled):
        trace_id = trace_id or event.task.trace_id
    return Step(entry.id, entry.ts, event.type, entry.worker_id, trace_id, attrs)


def ends_task(step: Step) -> bool:
    """Whether the task's trace is complete with ``step``: the queue acknowledged its
    outcome, or the queue took the task back (it will be handed out again)."""
    return step.type == "task.reported" or (
        step.type == "task.recovered" and step.attrs.get("action") == "lease_lost"
    )


@dataclass(slots=True)
class SpanData:
    """One span, ready for an exporter (hex ids, times in ns since the epoch)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start_ns: int
    end_ns: int
    kind: str = "internal"  # internal, client, consumer
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the status description when the span failed
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    remote_parent: bool = False  # the parent is the caller's (the task's traceparent)
    sampled: bool = True


@dataclass(slots=True)
class _Open:
    span: SpanData
    step: Step


def _prefixed(attrs: dict[str, Any]) -> dict[str, Any]:
    return {f"queue_worker.{k}": v for k, v in attrs.items()}


def build(eval_id: str, steps: list[Step]) -> list[SpanData]:
    """The spans of one task from its steps (in any order, repeats ignored); empty when
    none names a trace."""
    unique = {s.id: s for s in steps}
    ordered = sorted(unique.values(), key=lambda s: id_key(s.id))
    trace_id = next((s.trace_id for s in ordered if s.type == "task.pulled" and s.trace_id), None)
    trace_id = trace_id or next((s.trace_id for s in ordered if s.trace_id), None)
    if not ordered or trace_id is None:
        return []
    pulled = next((s for s in ordered if s.type == "task.pulled"), None)
    first, last = ordered[0], ordered[-1]
    parent_id, sampled = None, True
    incoming = pulled.attrs.get("traceparent") if pulled is not None else None
    if incoming is not None:
        try:
            parent = parse_traceparent(incoming)
        except InvalidTraceparent:
            parent = None
        if parent is not None and parent.trace_id == trace_id:
            parent_id, sampled = parent.parent_id, bool(int(parent.flags, 16) & 1)
    root_id = root_span_id(eval_id, trace_id, pulled.id if pulled is not None else None)
    root = SpanData(
        "evaluation",
        trace_id,
        root_id,
        parent_id,
        (pulled or first).ts * MS,
        last.ts * MS,
        kind="consumer",
        remote_parent=parent_id is not None,
        sampled=sampled,
    )
    root.attributes["queue_worker.eval_id"] = eval_id
    if pulled is not None:
        root.attributes["queue_worker.worker_id"] = pulled.worker
        root.attributes |= _prefixed({k: v for k, v in pulled.attrs.items() if k != "traceparent"})
    spans = [root]

    def child(
        name: str, step: Step, start_ms: int, kind: str = "internal", tag: str = ""
    ) -> SpanData:
        span = SpanData(
            name,
            trace_id,
            span_id(eval_id, step.id, tag),
            root_id,
            start_ms * MS,
            start_ms * MS,
            kind=kind,
            sampled=sampled,
        )
        span.attributes["queue_worker.eval_id"] = eval_id
        span.attributes["queue_worker.worker_id"] = step.worker
        spans.append(span)
        return span

    ready: int | None = pulled.ts if pulled is not None else None  # since: waiting for a slot
    chosen: Step | None = None  # the executor.selected of the next dispatch
    attempt: _Open | None = None
    report: _Open | None = None
    previous: Step | None = None
    attempts = 0

    def close_attempt(step: Step, outcome: str, error: str | None = None) -> None:
        nonlocal attempt
        if attempt is None:
            return
        attempt.span.end_ns = max(step.ts * MS, attempt.span.start_ns)
        attempt.span.attributes["queue_worker.outcome"] = outcome
        for key in ("duration_ms",):
            if key in step.attrs:
                attempt.span.attributes[f"queue_worker.{key}"] = step.attrs[key]
        attempt.span.error = error
        attempt = None

    for step in ordered:
        a = step.attrs
        match step.type:
            case "executor.selected":
                close_attempt(step, "rerouted", "throttled: routed again")
                if ready is not None and step.ts > ready:
                    wait = child("wait for slot", step, ready, tag="wait")
                    wait.end_ns = step.ts * MS
                    wait.attributes["queue_worker.attempt"] = a.get("attempt")
                ready, chosen = None, step
            case "task.dispatched":
                close_attempt(step, "rerouted")
                attempts += 1
                span = child("dispatch", step, step.ts, kind="client")
                span.attributes |= _prefixed(a)
                if chosen is not None:
                    span.attributes |= _prefixed(
                        {k: v for k, v in chosen.attrs.items() if k not in ("executor", "attempt")}
                    )
                    chosen = None
                attempt = _Open(span, step)
            case "task.retry_scheduled":
                close_attempt(step, a.get("reason", "failed"), a.get("reason", "failed"))
                backoff = child("retry backoff", step, step.ts, tag="backoff")
                delay = float(a.get("delay_ms", 0.0))
                backoff.end_ns = step.ts * MS + int(delay * MS)
                backoff.attributes |= _prefixed(a)
                ready = step.ts + int(delay)
            case "task.recovered":
                close_attempt(step, "interrupted", "the worker running it stopped")
                since = previous.ts if previous is not None else step.ts
                recovery = child("recovery", step, since, tag="recovery")
                recovery.end_ns = step.ts * MS
                recovery.attributes |= _prefixed(a)
                if previous is not None:
                    recovery.attributes["queue_worker.previous_worker_id"] = previous.worker
                ready = step.ts if a.get("action") == "redispatch" else None
            case "task.restored":
                root.events.append(("stream reset: task re-recorded", step.ts * MS, _prefixed(a)))
            case "task.cancelled":
                root.events.append(("cancelled", step.ts * MS, _prefixed(a)))
            case "task.answer_discarded":
                root.events.append(("late answer discarded", step.ts * MS, _prefixed(a)))
            case "task.lease_lost":
                root.events.append(("lease lost", step.ts * MS, {}))
            case "task.completed" | "task.failed":
                outcome = "completed" if step.type == "task.completed" else "failed"
                reason = a.get("reason")
                close_attempt(step, a.get("reason", "completed"), reason)
                if ready is not None and step.ts > ready and attempts == 0:
                    wait = child("wait for slot", step, ready, tag="wait")
                    wait.end_ns = step.ts * MS
                ready = None
                root.attributes["queue_worker.outcome"] = outcome
                root.attributes["queue_worker.attempts"] = a.get("attempt", attempts)
                if reason is not None:
                    root.attributes["queue_worker.reason"] = reason
                    root.error = reason
                span = child("report", step, step.ts, kind="client", tag="report")
                span.attributes["queue_worker.outcome"] = outcome
                report = _Open(span, step)
            case "task.reported":
                if report is not None:
                    report.span.end_ns = max(step.ts * MS, report.span.start_ns)
                    report.span.attributes |= _prefixed(
                        {k: v for k, v in a.items() if k != "outcome"}
                    )
                    report = None
        previous = step
    if attempt is not None:  # never answered within the history kept
        attempt.span.end_ns = last.ts * MS
        attempt.span.attributes["queue_worker.outcome"] = "unknown"
    if report is not None:
        report.span.end_ns = last.ts * MS
    root.end_ns = max(root.end_ns, root.start_ns)
    return spans
