"""The event store: append to and read from the deployment's Redis Stream.

Appends from concurrent coroutines are group-committed: one write is in
flight at a time, and everything that queued up meanwhile goes out next as one
pipeline (sent by a flusher task), so the cost in round trips per event falls
as load rises. An append that finds nothing queued and nothing in flight
writes at once from its own task, which saves the hops through the flusher on
the latency-critical path (a dispatch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from queue_worker.errors import QueueWorkerError
from queue_worker.streams.connection import RedisClient
from queue_worker.streams.events import (
    Entry,
    Event,
    TaskCompleted,
    TaskFailed,
    decode_event,
    encode_event,
)
from queue_worker.streams.keys import Keys

log = structlog.get_logger(__name__)

Fields = dict[bytes | str, bytes | str | int]
RawEntry = tuple[bytes, dict[bytes, bytes]]


def _retrieve(fut: asyncio.Future[list[str]]) -> None:
    if not fut.cancelled():
        fut.exception()


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


class EventBufferFull(QueueWorkerError):
    """Redis has been unreachable so long that the in-memory buffer is full."""


class EventStoreStopped(QueueWorkerError):
    """The store stopped before these events reached Redis."""


TRANSIENT = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)
Pending = tuple[list[Event], "asyncio.Future[list[str]]"]


class EventStore:
    """Append events (group-committed) and read them back.

    ``redis`` must be a client created with ``decode_responses=False``. When
    Redis is unreachable, appends wait (at most ``buffer_max`` events are held)
    while the flusher reconnects with backoff; each batch is one ``MULTI``, so
    it lands whole or not at all.
    """

    def __init__(
        self, redis: RedisClient, keys: Keys, worker_id: str, *, buffer_max: int = 10_000
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.buffer_max = buffer_max
        self.appended = 0
        self.round_trips = 0
        self.available = True  # False from a failed Redis call until the next one succeeds
        self.held = 0  # events waiting for Redis
        self._pending: list[Pending] = []
        self._writing = False  # a write is in flight (the flusher's or an append's own)
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
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(flusher, timeout_s)
        except TimeoutError:
            log.error("events_not_appended_at_stop", events=self.held)

    async def append(self, *events: Event) -> list[str]:
        """Append ``events`` in order; return their stream ids once Redis has them.

        Raises :class:`EventBufferFull` when Redis is down and the buffer is full.
        """
        if self._flusher is None:
            return await self._write(list(events))
        if self.held + len(events) > self.buffer_max:
            raise EventBufferFull(f"{self.held} events wait for Redis; buffer is full")
        if not self._writing and not self._pending and self.available:
            # Nothing in flight: write now, from this task. The reply then resumes the
            # caller directly instead of through the flusher (the dispatch path's latency).
            self._writing = True
            try:
                return await self._write(list(events))
            except TRANSIENT as exc:  # held below; the flusher writes it once Redis is back
                self.redis_state(ok=False)
                log.error("redis_unreachable_holding_events", events=len(events), error=str(exc))
            finally:
                self._writing = False
                if self._pending or self._closing:
                    self._wakeup.set()
            if self._closing:
                raise EventStoreStopped("event store stopped")
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)  # a cancelled caller leaves nobody to read it
        self._pending.append((list(events), fut))
        self.held += len(events)
        self._wakeup.set()
        return await asyncio.shield(fut)

    async def _flush_forever(self) -> None:
        batch: list[Pending] = []
        backoff_s = 0.05
        try:
            while True:
                if not self._pending or self._writing:  # an append may write its own
                    if self._closing and not self._pending and not self._writing:
                        return
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                batch, self._pending = self._pending, []
                events = [e for evs, _ in batch for e in evs]
                self._writing = True
                try:
                    ids = await self._write(events)
                except TRANSIENT as exc:
                    log.error(
                        "redis_unreachable_holding_events", events=len(events), error=str(exc)
                    )
                    self.redis_state(ok=False)
                    batch, self._pending = [], batch + self._pending
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 2.0)
                    continue
                except Exception as exc:  # not swallowed: each waiter gets it re-raised
                    self._settle(batch, exc)
                    batch = []
                    continue
                finally:
                    self._writing = False
                self.redis_state(ok=True)
                backoff_s = 0.05
                self._settle(batch, ids)
                batch = []
        finally:
            self._settle(batch + self._pending, EventStoreStopped("event store stopped"))
            self._pending = []

    def redis_state(self, *, ok: bool) -> None:
        """What a Redis call just showed; every user of the connection reports it."""
        if ok != self.available:
            log.info("redis_reachable" if ok else "redis_unreachable", held_events=self.held)
        self.available = ok

    def _settle(self, batch: list[Pending], outcome: list[str] | BaseException) -> None:
        offset = 0
        for events, fut in batch:
            self.held -= len(events)
            if not fut.done():
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome[offset : offset + len(events)])
            offset += len(events)

    async def _write(self, events: list[Event]) -> list[str]:
        ts = now_ms()
        async with self.redis.pipeline(transaction=len(events) > 1) as pipe:
            for event in events:
                pipe.xadd(self.keys.events, to_fields(event, self.worker_id, ts))  # type: ignore[arg-type]
            ids: list[bytes] = await pipe.execute()
        self.appended += len(events)
        self.round_trips += 1
        return [i.decode() for i in ids]

    async def full_result(self, event: TaskCompleted | TaskFailed) -> dict[str, Any] | None:
        """The event's result, in full even when the stream holds it ``truncated``."""
        if not event.truncated:
            return event.result
        raw = await self.redis.get(self.keys.result(event.eval_id))
        if raw is None:
            log.warning("full_result_missing", eval_id=event.eval_id)
            return event.result
        full: dict[str, Any] = msgspec.json.decode(raw)
        return full

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
