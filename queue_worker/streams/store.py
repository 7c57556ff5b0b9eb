"""The event store: append to and read from the deployment's Redis Stream.

Appends from concurrent coroutines are group-committed: one write is in
flight at a time, and everything that queued up meanwhile goes out next as one
script call (sent by a flusher task), so the cost in round trips per event falls
as load rises. An append that finds nothing queued and nothing in flight
writes at once from its own task, which saves the hops through the flusher on
the latency-critical path (a dispatch).

The script is also the fence: it refuses every append of a worker generation
that a peer took over, and it keeps one claim per task in flight, so a task
the queue hands out twice is not run twice (see ``APPEND``). It copies each outcome
entry to the outcome stream (``{<prefix>}:outcomes``) under the same id, which is all
the publisher and the reporter read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
import structlog

from queue_worker.errors import QueueWorkerError
from queue_worker.streams.claims import (
    APPEND,
    CLAIM_TTL_MS,
    DuplicateHandout,
    WorkerFenced,
    claim_op,
    index_op,
)
from queue_worker.streams.connection import REDIS_DOWN, REDIS_ERRORS, RedisClient, denied
from queue_worker.streams.entries import UNREADABLE, RawEntry, parse_entries
from queue_worker.streams.events import (
    AnyEvent,
    Entry,
    Event,
    TaskCompleted,
    TaskFailed,
    encode_event,
)
from queue_worker.streams.keys import Keys

log = structlog.get_logger(__name__)


def _retrieve(fut: asyncio.Future[list[str]]) -> None:
    if not fut.cancelled():
        fut.exception()


def _ids(result: list[str] | BaseException) -> list[str]:
    if isinstance(result, BaseException):
        raise result
    return result


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class EventBufferFull(QueueWorkerError):
    """Redis has been unreachable so long that the in-memory buffer is full."""


class EventStoreStopped(QueueWorkerError):
    """The store stopped before these events reached Redis."""


# What may go wrong while recording: Redis itself, or the store giving up (stopped,
# buffer full, fenced).
RECORDING_ERRORS = (*REDIS_ERRORS, QueueWorkerError)
# Redis errors no retry of a write mends (a bug of ours); every other one is held for.
NOT_RETRIED = (aioredis.DataError,)


def retried(exc: BaseException) -> bool:
    """Whether a failed write is held and tried again."""
    return isinstance(exc, REDIS_ERRORS) and not isinstance(exc, NOT_RETRIED)


Pending = tuple[list[Event], "asyncio.Future[list[str]]"]
Group = list[Event]
# Told of every write that landed: the stream's last id before it (None: the stream was
# empty), and the entries it appended, consecutive in the stream, in order.
AppendListener = Callable[[str | None, list[Entry]], None]


class EventStore:
    """Append events (group-committed) and read them back.

    ``redis`` must be a client created with ``decode_responses=False``. When
    Redis refuses or cannot take a write (unreachable, out of memory, read-only
    after a failover, ...), appends wait (at most ``buffer_max`` events are held)
    while the flusher tries again with backoff; each batch is one script, so it
    lands whole or not at all. ``writable`` is false meanwhile, with the reason in
    ``write_error``: the router pulls nothing while it is.
    """

    def __init__(
        self, redis: RedisClient, keys: Keys, worker_id: str, *, buffer_max: int = 10_000
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.generation = 0  # set by the liveness keeper before the first append
        self.buffer_max = buffer_max
        self.appended = 0
        self.round_trips = 0
        self.writable = True  # False from a refused write until a write succeeds
        self.write_error: str | None = None
        self.reachable = True  # False from a failed Redis call until the next one succeeds
        self.fenced = False  # a peer took this worker over: nothing can be appended any more
        self.last_id: str | None = None  # the newest id this store appended
        # Outcome copies that could not take their main stream id (the outcome stream was
        # ahead: written to by hand); each carries ``entry_id`` instead.
        self.outcome_ids_diverged = 0
        self.outcome_copies_missing = 0  # the outcome stream took no id at all (exhausted)
        self.index_writes_refused = 0  # task index or budget writes Redis refused (see APPEND)
        self.held = 0  # events waiting for Redis
        self.listeners: list[AppendListener] = []  # told of each write (the status fold)
        self._pending: list[Pending] = []
        self._writing = False  # a write is in flight (the flusher's or an append's own)
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        # RedisCluster has register_script too; redis-py types it for Redis only.
        self._append_script = cast(aioredis.Redis, redis).register_script(APPEND)
        # eval_id -> its trace id, for the tasks this process holds (the router's
        # registry): an event of such a task recorded without ``trace_id`` gets it.
        self.trace_of: Callable[[str], str | None] | None = None

    def _traced(self, event: Event) -> Event:
        """``event`` with its task's ``trace_id`` when it has that field unset."""
        if self.trace_of is None or getattr(event, "trace_id", "") is not None:
            return event
        trace_id = self.trace_of(event.eval_id_or_empty)
        return event if trace_id is None else msgspec.structs.replace(event, trace_id=trace_id)

    @property
    def writing(self) -> bool:
        """A write is in flight (its reply not handled yet)."""
        return self._writing

    @property
    def available(self) -> bool:
        """Appends reach Redis right now (nothing refused, nothing unreachable)."""
        return self.writable and self.reachable and not self.fenced

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

        Raises :class:`EventBufferFull` when Redis is down and the buffer is full,
        :class:`WorkerFenced` when a peer took this worker over, and
        :class:`DuplicateHandout` (nothing appended) when ``events`` claim a task that
        is in flight at another live worker.
        """
        if self.trace_of is not None:
            events = tuple(self._traced(event) for event in events)
        if self._flusher is None:
            return _ids((await self._write([list(events)]))[0])
        if self.fenced:
            raise WorkerFenced("a peer took this worker over")
        if self.held + len(events) > self.buffer_max:
            raise EventBufferFull(f"{self.held} events wait for Redis; buffer is full")
        if not self._writing and not self._pending and self.available:
            # Nothing in flight: write now, from this task. The reply then resumes the
            # caller directly instead of through the flusher (the dispatch path's latency).
            self._writing = True
            try:
                result = (await self._write_settled([list(events)]))[0]
            except Exception as exc:
                if not retried(exc):
                    raise
                await self._refused(exc, len(events))  # held below; the flusher retries
            else:
                return _ids(result)
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
                self._writing = True
                try:
                    results = await self._write_settled([events for events, _ in batch])
                except Exception as exc:
                    if retried(exc):
                        await self._refused(exc, sum(len(events) for events, _ in batch))
                        batch, self._pending = [], batch + self._pending
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(backoff_s * 2, 2.0)
                        continue
                    if isinstance(exc, WorkerFenced):  # nothing queued can land either
                        self._pending, batch = [], batch + self._pending
                    self._settle(batch, [exc] * len(batch))  # each waiter gets it re-raised
                    batch = []
                    continue
                finally:
                    self._writing = False
                backoff_s = 0.05
                self._settle(batch, results)
                batch = []
        finally:
            stopped = EventStoreStopped("event store stopped")
            left = batch + self._pending
            self._settle(left, [stopped] * len(left))
            self._pending = []

    async def _refused(self, exc: Exception, events: int) -> None:
        """A write that may pass later: hold its events, say why, and reconnect when
        the server turned read-only (after a failover the name may point elsewhere)."""
        reason = f"{type(exc).__name__}: {exc}"
        if self.writable or reason != self.write_error:
            log.error("redis_refused_write_holding_events", events=events, error=reason)
        self.writable, self.write_error = False, reason
        if isinstance(exc, REDIS_DOWN):
            self.redis_state(ok=False)
        if isinstance(exc, aioredis.ReadOnlyError) and isinstance(self.redis, aioredis.Redis):
            await self.redis.connection_pool.disconnect()

    def write_refused(self, exc: Exception) -> None:
        """Another write (the liveness key) was refused: appends would be too."""
        reason = f"{type(exc).__name__}: {exc}"
        if self.writable:
            log.error("redis_refused_write", error=reason)
        self.writable, self.write_error = False, reason

    def note_write_ok(self) -> None:
        """Another write (the liveness key) went through: with nothing held, appends
        will too. The router pulls again."""
        self.redis_state(ok=True)
        if not self.writable and not self._pending and not self._writing:
            self._writable()

    def _writable(self) -> None:
        if not self.writable:
            log.info("redis_accepts_writes", held_events=self.held)
        self.writable, self.write_error = True, None

    def redis_state(self, *, ok: bool) -> None:
        """What a Redis call just showed; every user of the connection reports it."""
        if ok != self.reachable:
            log.info("redis_reachable" if ok else "redis_unreachable", held_events=self.held)
        self.reachable = ok

    def _settle(self, batch: list[Pending], outcomes: Sequence[list[str] | BaseException]) -> None:
        for (events, fut), outcome in zip(batch, outcomes, strict=True):
            self.held -= len(events)
            if not fut.done():
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)

    async def _write_settled(self, groups: list[Group]) -> list[list[str] | BaseException]:
        """Write ``groups``; mark the store writable and reachable when Redis took them."""
        results = await self._write(groups)
        self.redis_state(ok=True)
        self._writable()
        return results

    async def _write(self, groups: list[Group]) -> list[list[str] | BaseException]:
        """Append each group in one script call; per group its ids, or the
        :class:`DuplicateHandout` that kept it out. Raises what Redis raised."""
        gen, ts = self.generation, now_ms()
        args: list[bytes | str | int] = [self.worker_id, gen, ts, self.keys.tag, CLAIM_TTL_MS]
        for events in groups:
            args.append(len(events))
            for event in events:
                state, executor = index_op(event)
                args += [
                    event.type, event.eval_id_or_empty, encode_event(event), claim_op(event),
                    state, executor,
                ]  # fmt: skip
        try:
            keys = [self.keys.events, self.keys.fenced, self.keys.outcomes, self.keys.tasks]
            replies = await self._append_script(keys=keys, args=args)
        except aioredis.ResponseError as exc:
            if str(exc).startswith("FENCED"):
                self.fenced = True
                raise WorkerFenced(str(exc)) from exc
            raise
        self.round_trips += 1
        results: list[list[str] | BaseException] = []
        written: list[Entry] = []
        for events, (status, value, *rest) in zip(groups, replies[1:], strict=True):
            if status == b"DUP":
                results.append(DuplicateHandout(value.decode()))
                continue
            ids = [i.decode() for i in value]
            if rest:
                self._copies_noted(ids, int(rest[0]), [i.decode() for i in rest[1]])
            if len(rest) > 2 and int(rest[2]):
                self._index_refused(ids, int(rest[2]))
            self.appended += len(ids)
            if ids:
                self.last_id = ids[-1]
            results.append(ids)
            if self.listeners:
                written += [
                    Entry(id=i, worker_id=self.worker_id, ts=ts, event=cast(AnyEvent, e), gen=gen)
                    for i, e in zip(ids, events, strict=True)
                ]
        if written:
            self._tell(replies[0].decode() or None, written)
        return results

    def _tell(self, before: str | None, written: list[Entry]) -> None:
        for listener in self.listeners:
            try:
                listener(before, written)
            except Exception:  # a listener's bug must not fail an append that landed
                log.exception("append_listener_failed")

    def _index_refused(self, ids: list[str], refused: int) -> None:
        """Redis refused writes of the task index or the retry budget's count (a key of
        another type, written by hand): the entries are appended all the same."""
        self.index_writes_refused += refused
        log.error(
            "task_index_write_refused",
            writes=refused,
            ids=ids,
            hint="a {prefix}:task:*, tasks, tasks:* or budget:* key holds another type: "
            "the task views and the retry budget miss these entries",
        )

    def _copies_noted(self, ids: list[str], diverged: int, missing: list[str]) -> None:
        """Say when outcome copies did not take their main stream id, or no id at all."""
        if diverged:
            self.outcome_ids_diverged += diverged
            log.error(
                "outcome_id_diverged",
                stream=self.keys.outcomes,
                entries=diverged,
                ids=ids,
                hint="the outcome stream is ahead of the main stream; its copies carry entry_id",
            )
        if missing:
            self.outcome_copies_missing += len(missing)
            log.error(
                "outcome_copy_missing",
                stream=self.keys.outcomes,
                ids=missing,
                hint="the outcome stream takes no more ids (written to by hand): these "
                "outcomes are in the main stream only, neither published nor reported",
            )

    async def full_result(self, event: TaskCompleted | TaskFailed) -> dict[str, Any] | None:
        """The event's result, in full even when the stream holds it ``truncated``.

        When the full copy is gone or unreadable: the stream's (cut) result.
        """
        if not event.truncated:
            return event.result
        full = await self.stored_result(event.eval_id)
        return event.result if full is None else full

    async def stored_result(self, eval_id: str) -> dict[str, Any] | None:
        """The full result kept beside a truncated event; ``None`` (logged) when it is
        gone or cannot be read."""
        raw = await self.redis.get(self.keys.result(eval_id))
        if raw is None:
            log.warning("full_result_missing", eval_id=eval_id)
            return None
        try:
            full: Any = msgspec.json.decode(raw)
        except UNREADABLE as exc:
            error = "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            log.warning("full_result_unreadable", eval_id=eval_id, error=error)
            return None
        if not isinstance(full, dict):
            log.warning("full_result_unreadable", eval_id=eval_id, error="not an object")
            return None
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

    async def read_ids(self, ids: list[str]) -> list[Entry]:
        """The readable entries with these ids, in the order given (one round trip; an id
        trimmed away is skipped)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(self.keys.events, entry_id, entry_id, count=1)
            found: list[list[RawEntry]] = await pipe.execute()
        return list(parse_entries([raw for raws in found for raw in raws]))

    async def read_all(self) -> list[Entry]:
        return [e async for e in self.read_range()]

    async def length(self) -> int:
        n: int = await self.redis.xlen(self.keys.events)
        return n

    async def oldest_pending(self, group: str, stream: str | None = None) -> str | None:
        """The id of the oldest entry ``group`` was delivered and has not acknowledged, on
        ``stream`` (the main one by default); ``None`` when it has none pending."""
        summary = await self.redis.xpending(stream or self.keys.events, group)
        lowest = summary.get("min")
        if not lowest:
            return None
        return lowest.decode() if isinstance(lowest, bytes) else str(lowest)

    async def info_groups(self, stream: str | None = None) -> list[dict[str, Any]]:
        """``XINFO GROUPS`` of ``stream`` (the main one by default) as plain dicts with str
        keys (empty when the stream is missing)."""
        try:
            groups = await self.redis.xinfo_groups(stream or self.keys.events)
        except aioredis.ResponseError as exc:
            if denied(exc):
                raise  # not "no groups": retention would trim what they have not read
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
