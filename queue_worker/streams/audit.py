"""One evaluation's history from the stream, for operators."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from queue_worker.streams import events as ev
from queue_worker.streams.events import Entry
from queue_worker.streams.store import EventStore


async def history(store: EventStore, eval_id: str) -> list[Entry]:
    """Every entry about ``eval_id``, oldest first (a scan of the stream)."""
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
    if not entries:
        return f"no events for evaluation {eval_id!r}"
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
    return "\n".join(lines)


def history_json(entries: list[Entry]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = msgspec.to_builtins(entries)
    return out
