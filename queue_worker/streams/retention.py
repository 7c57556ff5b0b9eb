"""Stream retention: trim to about ``maxlen`` entries, never below what is still needed.

``XADD … MAXLEN ~`` is not enough: it would drop entries that a consumer group
has not read or acknowledged yet. The trim point is the lowest of: the
entry ``maxlen`` back from the end, every group's oldest pending entry and
last-delivered id, and the oldest ``task.pulled`` of a task still in flight
(recovery reads it). ``XTRIM MINID ~`` then removes whole nodes below it.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

MAX_SCAN = 10_000  # entries inspected per round, so a round stays cheap


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def trim_point(store: EventStore, maxlen: int, protect: Iterable[str] = ()) -> str | None:
    """The id below which entries may go, or ``None`` when nothing may."""
    redis, key = store.redis, store.keys.events
    excess = await store.length() - maxlen
    if excess <= 0:
        return None
    raws = await redis.xrange(key, "-", "+", count=min(excess, MAX_SCAN) + 1)
    if not raws:
        return None
    candidates = [raws[-1][0].decode(), *protect]
    for group in await store.info_groups():
        candidates.append(str(group["last-delivered-id"]))
        if group.get("pending"):
            summary = await redis.xpending(key, group["name"])
            lowest = summary.get("min")
            if lowest:
                candidates.append(lowest.decode() if isinstance(lowest, bytes) else str(lowest))
    point = min(candidates, key=id_key)
    return None if id_key(point) <= (0, 0) else point


async def trim(
    store: EventStore, maxlen: int, protect: Iterable[str] = (), *, approximate: bool = True
) -> int:
    """One retention round; returns the entries removed (approximate: whole nodes only)."""
    point = await trim_point(store, maxlen, protect)
    if point is None:
        return 0
    removed: int = await store.redis.xtrim(store.keys.events, minid=point, approximate=approximate)
    if removed:
        log.info("stream_trimmed", removed=removed, below=point)
    return removed
