"""The event store: append to and read from the deployment's Redis Stream.

Appends from concurrent coroutines are group-committed: a single flusher
sends everything that queued up while the previous round trip was in flight
as one pipeline, so the cost in round trips per event falls as load rises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from queue_worker.streams.events import Entry, Event, decode_event, encode_event
from queue_worker.streams.keys import Keys

log = structlog.get_logger(__name__)

Fields = dict[bytes | str, bytes | str | int]
RawEntry = tuple[bytes, dict[bytes, bytes]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_fields(event: Event, worker_id: str, ts: int) -> Fields:
    return {
        "type": event.type,
        "eval_id": event.eval_id_or_empty,
        "worker_id": worker_id,
        "ts": ts,
        "data": encode_event(event),
    }


def parse_entry(raw: RawEntry) -> Entry | None:
    """Decode one ``XRANGE``/``XREAD`` entry; ``None`` for an entry we cannot read."""
    entry_id, fields = raw
    try:
        event = decode_event(fields[b"data"])
        return Entry(
            id=entry_id.decode(),
            worker_id=fields.get(b"worker_id", b"").decode(),
            ts=int(fields.get(b"ts", b"0")),
            event=event,
        )
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        log.warning("stream_entry_unreadable", entry_id=entry_id.decode(), error=str(exc))
        return None


def parse_entries(raws: Sequence[RawEntry]) -> list[Entry]:
    return [e for e in map(parse_entry, raws) if e is not None]


class EventStore:
    """Append events (group-committed) and read them back.

    ``redis`` must be a client created with ``decode_responses=False``.
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys, worker_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.appended = 0
        self.round_trips = 0
        self._pending: list[tuple[list[Event], asyncio.Future[list[str]]]] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="event-store-flusher")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (for up to ``timeout_s``), then stop the flusher."""
        flusher, self._flusher = self._flusher, None
        if flusher is None:
            return
        self._wakeup.set()
        self._closing = True
        try:
            await asyncio.wait_for(flusher, timeout_s)
        except TimeoutError:
            log.error("event_store_flush_timeout", pending=len(self._pending))
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("event store stopped"))
        self._pending.clear()

    async def append(self, *events: Event) -> list[str]:
        """Append ``events`` in order; return their stream ids once Redis has them."""
        if self._flusher is None:
            return await self._write(list(events))
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append((list(events), fut))
        self._wakeup.set()
        return await asyncio.shield(fut)

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            if not batch:
                if self._closing:
                    return
                continue
            try:
                ids = await self._write([e for events, _ in batch for e in events])
            except asyncio.CancelledError:
                self._pending[:0] = batch
                raise
            except Exception as exc:  # not swallowed: each waiter gets it re-raised
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            offset = 0
            for events, fut in batch:
                if not fut.done():
                    fut.set_result(ids[offset : offset + len(events)])
                offset += len(events)
            if self._closing:
                self._wakeup.set()

    async def _write(self, events: list[Event]) -> list[str]:
        ts = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(self.keys.events, to_fields(event, self.worker_id, ts))  # type: ignore[arg-type]
            ids: list[bytes] = await pipe.execute()
        self.appended += len(events)
        self.round_trips += 1
        return [i.decode() for i in ids]

    async def read_range(
        self, start: str = "-", end: str = "+", *, batch: int = 1000
    ) -> AsyncIterator[Entry]:
        """Every readable entry from ``start`` to ``end`` inclusive, in order."""
        lower = start
        while True:
            raws: list[RawEntry] = await self.redis.xrange(
                self.keys.events, lower, end, count=batch
            )
            for entry in parse_entries(raws):
                yield entry
            if len(raws) < batch:
                return
            lower = "(" + raws[-1][0].decode()

    async def read_all(self) -> list[Entry]:
        return [e async for e in self.read_range()]

    async def length(self) -> int:
        n: int = await self.redis.xlen(self.keys.events)
        return n

    async def info_groups(self) -> list[dict[str, Any]]:
        """``XINFO GROUPS`` as plain dicts with str keys (empty when the stream is missing)."""
        try:
            groups = await self.redis.xinfo_groups(self.keys.events)
        except aioredis.ResponseError:
            return []
        out: list[dict[str, Any]] = []
        for group in groups:
            out.append(
                {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode() if isinstance(v, bytes) else v
                    )
                    for k, v in group.items()
                }
            )
        return out
