"""One evaluation's history from the stream, for operators.

Whatever the stream holds came from outside (eval ids, executor errors, payload
excerpts): text meant for a terminal goes through :func:`printable`, JSON
through :func:`json_printable`, so it can neither send escape sequences nor
forge lines.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec

from queue_worker.streams import events as ev
from queue_worker.streams.events import Entry
from queue_worker.streams.index import TaskIndex
from queue_worker.streams.store import EventStore

# C0 controls, DEL and C1 controls, plus Unicode's line separators and bidi controls
# (which reorder what a terminal shows).
_UNICODE_CONTROLS = (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES |= {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES |= {c: f"\\u{c:04x}" for c in _UNICODE_CONTROLS}
_PRINTABLE = str.maketrans(_ESCAPES)
# The same characters as UTF-8 inside JSON text (where C0 is escaped already); each byte
# sequence can only be that character, and only inside a string.
_JSON_RAW = re.compile(
    b"|".join(re.escape(chr(c).encode()) for c in (0x7F, *range(0x80, 0xA0), *_UNICODE_CONTROLS))
)


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\n``), for a terminal."""
    return text.translate(_PRINTABLE)


def json_printable(data: bytes) -> bytes:
    """JSON text with DEL, the C1 controls and the Unicode line separators and bidi
    controls written as ``\\u`` escapes; still the same JSON value."""
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m[0].decode()):04x}".encode(), data)


async def history(store: EventStore, eval_id: str) -> list[Entry]:
    """Every entry about ``eval_id``, oldest first: from the task index when it knows the
    task, else a scan of the stream."""
    indexed = await TaskIndex(store.redis, store.keys).history(store, eval_id)
    if indexed:
        return indexed
    return [e async for e in store.read_range() if e.event.eval_id_or_empty == eval_id]


def _detail(event: ev.Event) -> str:
    match event:
        case ev.TaskPulled():
            t = event.task
            return f"code={event.code_bytes}B timeout={t.timeout} language={t.language}"
        case ev.ExecutorSelected():
            seen = ", ".join(
                f"{c.executor}({'up' if c.healthy else 'down'} {c.in_flight}/{c.capacity})"
                for c in event.candidates
            )
            why = f" ({event.why})" if event.why else ""
            return f"{event.executor} by {event.strategy}{why}, attempt {event.attempt}; saw {seen}"
        case ev.TaskDispatched():
            return f"{event.executor} attempt {event.attempt} timeout={event.timeout_s:g}s"
        case ev.TaskCompleted():
            return f"{event.executor} in {event.duration_ms:.1f} ms"
        case ev.TaskFailed():
            where = f" on {event.executor}" if event.executor else ""
            return f"{event.reason}{where}: {event.error}"
        case ev.TaskRejected():
            return f"{event.reason}; payload: {event.excerpt}"
        case ev.TaskReported():
            already = " (already reported)" if event.already else ""
            return f"{event.outcome}, HTTP {event.http_status}{already}"
    return ""


def format_history(eval_id: str, entries: list[Entry]) -> str:
    """The history as lines for a terminal (control characters escaped)."""
    if not entries:
        return printable(f"no events for evaluation {eval_id!r}")
    lines = [f"history of evaluation {eval_id} ({len(entries)} events)"]
    first = entries[0].ts
    previous = first
    for e in entries:
        when = datetime.fromtimestamp(e.ts / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
        lines.append(
            f"  {when}  +{e.ts - first:>6} ms (+{e.ts - previous:>5})  "
            f"{e.event.type:<18} {e.worker_id:<16} {_detail(e.event)}".rstrip()
        )
        previous = e.ts
    return "\n".join(printable(line) for line in lines)


def history_json(entries: list[Entry]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = msgspec.to_builtins(entries)
    return out
