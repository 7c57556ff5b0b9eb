"""W3C Trace Context (``traceparent``, ``tracestate``) and the span ids derived from the log.

Pure functions, no I/O. A ``traceparent`` from outside is validated strictly
(:func:`parse_traceparent`); an invalid one is never an exception: the caller starts a
new trace and records why the one it got was ignored.

Span ids are derived, not drawn: :func:`span_id` hashes the evaluation and the stream
entry that opens the span, so the worker (sending ``traceparent`` on ``POST /execute``
and on the reports) and the span projector (building the spans later, perhaps in
another replica, perhaps again after a re-delivery) name the same span the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

TRACEPARENT_MAX_CHARS = 55  # "00-" + 32 + "-" + 16 + "-" + 2
TRACESTATE_MAX_CHARS = 512  # the W3C limit (32 members of list-members, at most 512 chars)
ZERO_TRACE = "0" * 32
ZERO_SPAN = "0" * 16
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# tracestate: list-members key=value, keys lowercase (with an optional tenant@system),
# values printable ASCII without ',' and '='.
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][a-z0-9_\-*/]{0,255}(@[a-z0-9][a-z0-9_\-*/]{0,13})?=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


class InvalidTraceparent(ValueError):
    """A ``traceparent`` that is not version 00 of the W3C format (the reason says why)."""


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str  # 32 lowercase hex, not all zero
    parent_id: str  # 16 lowercase hex, not all zero
    flags: str  # 2 lowercase hex

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse_traceparent(value: object) -> TraceParent:
    """The ``traceparent`` ``value`` as W3C version 00 defines it; raises
    :class:`InvalidTraceparent` for anything else (another type, another version, upper
    case, an all-zero id, extra text)."""
    if not isinstance(value, str):
        raise InvalidTraceparent(f"not a string ({type(value).__name__})")
    if len(value) != TRACEPARENT_MAX_CHARS:
        raise InvalidTraceparent(f"{min(len(value), 10**6)} characters, expected 55")
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        raise InvalidTraceparent("not 00-<32 hex>-<16 hex>-<2 hex> in lowercase")
    trace_id, parent_id, flags = match.groups()
    if trace_id == ZERO_TRACE:
        raise InvalidTraceparent("trace id is all zeros")
    if parent_id == ZERO_SPAN:
        raise InvalidTraceparent("parent id is all zeros")
    return TraceParent(trace_id, parent_id, flags)


def parse_tracestate(value: object) -> str | None:
    """``value`` when it is a valid ``tracestate`` (at most 512 characters, 32 members),
    else ``None``: a bad ``tracestate`` is dropped, the ``traceparent`` still holds."""
    if not isinstance(value, str) or not value or len(value) > TRACESTATE_MAX_CHARS:
        return None
    members = [m.strip() for m in value.split(",")]
    if len(members) > 32 or not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members if m):
        return None
    return ",".join(m for m in members if m) or None


def new_trace_id() -> str:
    """A random trace id (never all zeros)."""
    while True:
        trace_id = os.urandom(16).hex()
        if trace_id != ZERO_TRACE:
            return trace_id


def span_id(eval_id: str, entry_id: str, kind: str = "") -> str:
    """The id of the span of evaluation ``eval_id`` opened by the stream entry
    ``entry_id`` (``kind`` tells apart spans one entry opens): 16 hex, never all zeros."""
    digest = hashlib.sha256(f"{eval_id}\n{entry_id}\n{kind}".encode()).hexdigest()[:16]
    return digest if digest != ZERO_SPAN else "0" * 15 + "1"


def root_span_id(eval_id: str, trace_id: str, handout: str | None = None) -> str:
    """The id of the evaluation's root span: the same in every replica and every run.
    ``handout``, the id of the ``task.pulled`` entry the trace starts with, tells apart
    the traces of a task the queue handed out again (after ``lease_lost``): they share
    the task's trace id."""
    if handout is None:
        return span_id(eval_id, trace_id, "evaluation")
    return span_id(eval_id, f"{trace_id}/{handout}", "evaluation")


def traceparent(trace_id: str, parent_id: str, sampled: bool = True) -> str:
    """A ``traceparent`` header naming span ``parent_id`` of trace ``trace_id``."""
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}"


def sampled(header: str | None) -> bool:
    """Whether the (valid) ``traceparent`` ``header`` asks for the trace to be recorded;
    ``True`` for a trace the worker started itself."""
    return header is None or bool(int(header[-2:], 16) & 1)


def trace_headers(
    trace_id: str | None, span: str, incoming: str | None = None, state: str | None = None
) -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) headers of a call made inside span ``span``
    of trace ``trace_id``; ``incoming`` is the task's own traceparent, whose sampling flag
    is kept. No headers for an untraced task (``trace_id`` ``None``)."""
    if trace_id is None:
        return {}
    headers = {"traceparent": traceparent(trace_id, span, sampled(incoming))}
    if state:
        headers["tracestate"] = state
    return headers
