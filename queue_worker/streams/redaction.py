"""What a reader of the HTTP API sees of a task's payloads: sizes and hashes, not content.

The stream keeps every event whole (recovery and reports need the code and the result).
What the worker shows over HTTP to a read token (``/events/stream``) replaces the task's
code, the executor's output and error texts, and an answer the queue sent that was not a
task, with :func:`digest`::

    {"redacted": true, "bytes": 1234, "sha256": "<64 hex digits>"}

``bytes`` is the size of the UTF-8 text (or of the JSON of a list or object), ``sha256``
its hash: equal payloads can be told equal, and a payload held elsewhere can be matched,
without being shown. Numbers, booleans and ``null`` stay as they are, and so does a
result's ``status`` (``completed``, ``failed``, ``timeout``...).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder(order="sorted")

# Per event type, the fields whose content is the task's or the executor's.
PAYLOAD_FIELDS: dict[str, tuple[str, ...]] = {
    "task.pulled": ("task",),
    "task.restored": ("task",),
    "task.completed": ("result",),
    "task.failed": ("error", "result", "attempts"),
    "task.retry_scheduled": ("error",),
    "task.rejected": ("excerpt",),
}
KEPT_IN_RESULT = frozenset({"status", "eval_id", "executor_id"})
KEPT_IN_TASK = frozenset(
    {"eval_id", "language", "engine", "timeout", "priority", "lease_s", "deadline"}
)


def digest(value: Any) -> dict[str, Any]:
    """``{"redacted": true, "bytes": N, "sha256": "..."}`` for a text, or a value's JSON."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else None
    if data is None:
        data = _encoder.encode(value)
    return {"redacted": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float)


def _redact_mapping(value: Any, kept: frozenset[str]) -> Any:
    """An object with every field outside ``kept`` that is not a number, boolean or null
    replaced by its digest; anything else as a whole digest."""
    if not isinstance(value, dict):
        return value if _scalar(value) else digest(value)
    return {
        key: item if key in kept or _scalar(item) else digest(item) for key, item in value.items()
    }


def _redact_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "result":
        return _redact_mapping(value, KEPT_IN_RESULT)
    if name == "task":
        return _redact_mapping(value, KEPT_IN_TASK)
    if name == "attempts" and isinstance(value, list):
        return [_redact_mapping(a, frozenset({"attempt", "executor", "reason"})) for a in value]
    return digest(value)


def redact_event(event: dict[str, Any]) -> dict[str, Any]:
    """A copy of an event (as JSON-like builtins) without task or executor payloads."""
    fields = PAYLOAD_FIELDS.get(str(event.get("type")), ())
    if not fields:
        return event
    return {
        key: _redact_field(key, value) if key in fields else value for key, value in event.items()
    }
