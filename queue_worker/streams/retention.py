"""Stream retention: trim to about ``maxlen`` entries, never below what is still needed.

``XADD … MAXLEN ~`` is not enough: it would drop entries that a consumer group
has not read or acknowledged yet. The trim point is the lowest of: the
entry ``maxlen`` back from the end, every group's oldest pending entry and (when it
has not read the whole stream) its last-delivered id, on the main stream and on the
outcome stream, and the oldest ``task.pulled`` of a task still in flight
(recovery reads it). ``XTRIM MINID ~`` then removes whole nodes below it from both
streams: an outcome keeps the id of its main stream entry, so one point fits both.

A group named in ``lossy`` does not hold trimming back: the span projector's
(``tracing``), whose entries are worth less than the disk they hold. Spans of what it
had not read when the stream was trimmed are lost; a ``tracing`` group left behind when
tracing is turned off never stops the stream from being trimmed.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from queue_worker.streams.entries import id_key
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

MAX_SCAN = 10_000  # entries inspected per round, so a round stays cheap


async def trim_point(
    store: EventStore,
    maxlen: int,
    protect: Iterable[str] = (),
    lossy: Iterable[str] = (),
    length: int | None = None,
) -> str | None:
    """The id below which entries may go, or ``None`` when nothing may (the groups named
    in ``lossy`` are not waited for). ``length``: the main stream's, when just read."""
    redis, key = store.redis, store.keys.events
    excess = (await store.length() if length is None else length) - maxlen
    if excess <= 0:
        return None
    raws = await redis.xrange(key, "-", "+", count=min(excess, MAX_SCAN) + 1)
    if not raws:
        return None
    candidates = [raws[-1][0].decode(), *protect]
    for stream in (key, store.keys.outcomes):
        candidates += await _unfinished(store, stream, set(lossy))
    point = min(candidates, key=id_key)
    return None if id_key(point) <= (0, 0) else point


async def _unfinished(store: EventStore, stream: str, skipped: set[str]) -> list[str]:
    """Per group of ``stream`` (but those in ``skipped``): its oldest pending id, and its
    last-delivered id unless it has read up to the stream's last entry."""
    found = []
    newest = await store.redis.xrevrange(stream, count=1)
    last = newest[0][0].decode() if newest else "0-0"
    for group in await store.info_groups(stream):
        if _name(group["name"]) in skipped:
            continue
        delivered = str(group["last-delivered-id"])
        if id_key(delivered) < id_key(last):  # entries it has not read
            found.append(delivered)
        if group.get("pending") and (lowest := await store.oldest_pending(group["name"], stream)):
            found.append(lowest)
    return found


def _name(name: object) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


async def trim(
    store: EventStore,
    maxlen: int,
    protect: Iterable[str] = (),
    *,
    approximate: bool = True,
    lossy: Iterable[str] = (),
    length: int | None = None,
) -> int:
    """One retention round; returns the entries removed from the main stream
    (approximate: whole nodes only). The outcome stream is trimmed at the same point.
    ``length``: the main stream's, when the caller has just read it."""
    point = await trim_point(store, maxlen, protect, lossy, length)
    if point is None:
        return 0
    redis = store.redis
    removed: int = await redis.xtrim(store.keys.events, minid=point, approximate=approximate)
    outcomes: int = await redis.xtrim(store.keys.outcomes, minid=point, approximate=approximate)
    if removed or outcomes:
        log.info("stream_trimmed", removed=removed, outcomes_removed=outcomes, below=point)
    return removed
