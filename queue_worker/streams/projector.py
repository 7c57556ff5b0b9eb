"""Projector runners: read the stream, fold or act, checkpoint.

* :class:`TailProjector` folds every entry into an in-process view with
  ``XREAD`` (each process has its own; it starts by replaying the stream).
* :class:`GroupProjector` reads through a consumer group with
  ``XREADGROUP``; its ``handle`` performs the side effect and acknowledges.
  On start it first re-reads its own pending entries (a crash left them
  unacknowledged), and it periodically takes over entries that another,
  dead consumer left pending for longer than ``claim_idle_ms`` (``XAUTOCLAIM``).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog

from queue_worker.streams.events import Entry, EntryDeadLettered
from queue_worker.streams.store import EventStore, RawEntry, parse_entry
from queue_worker.streams.views import StatusView, apply

log = structlog.get_logger(__name__)

REDIS_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)
# After a read that did not fill a batch, wait this long so the next read takes
# what accumulated meanwhile: far fewer round trips under load, for a few ms of lag.
LINGER_MS = 10.0
# Entries a group projector has nothing to do for are acknowledged with its next
# batch, or after this long without one.
IDLE_ACK_MS = 100


async def linger(raws: Sequence[object], batch: int, linger_s: float) -> None:
    if raws and len(raws) < batch and linger_s > 0:
        await asyncio.sleep(linger_s)


# (entry id, entry); the entry is None when there is nothing to do for it: it is
# unreadable, or of a type the projector does not handle. Every id gets acknowledged.
Batch = list[tuple[str, Entry | None]]


class TailProjector:
    """Keeps ``view`` folded up to the stream's last entry."""

    def __init__(
        self,
        store: EventStore,
        *,
        block_ms: int = 1000,
        batch: int = 1000,
        linger_ms: float = LINGER_MS,
        on_entry: Sequence[Callable[[Entry], None]] = (),
    ) -> None:
        self.store = store
        self.view = StatusView()
        self.linger_s = linger_ms / 1000
        self.on_entry = list(on_entry)  # called with every entry folded, replay included
        self.block_ms = block_ms
        self.batch = batch
        self.replayed = asyncio.Event()
        self.replay_seconds = 0.0
        self.replay_events = 0
        self._changed = asyncio.Condition()

    def _apply(self, entry: Entry) -> None:
        apply(self.view, entry)
        for observe in self.on_entry:
            observe(entry)

    async def replay(self) -> None:
        started = time.perf_counter()
        async for entry in self.store.read_range(batch=self.batch):
            self._apply(entry)
        self.replay_seconds = time.perf_counter() - started
        self.replay_events = self.view.events
        self.replayed.set()
        log.info("status_replayed", events=self.view.events, seconds=round(self.replay_seconds, 3))

    async def run(self) -> None:
        if not self.replayed.is_set():
            await self.replay()
        redis = self.store.redis
        while True:
            last = self.view.last_id or "0-0"
            try:
                resp = await redis.xread(
                    {self.store.keys.events: last}, count=self.batch, block=self.block_ms
                )
            except REDIS_DOWN as exc:
                self.store.redis_state(ok=False)
                log.warning("status_projector_redis_error", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self.store.redis_state(ok=True)
            if not resp:
                continue
            for _stream, raws in resp:
                for raw in raws:
                    entry = parse_entry(raw)
                    if entry is not None:
                        self._apply(entry)
                    else:
                        self.view.last_id = raw[0].decode()
            async with self._changed:
                self._changed.notify_all()
            await linger(resp[0][1], self.batch, self.linger_s)

    async def wait_for(self, predicate: Callable[[StatusView], bool], timeout_s: float) -> None:
        """Wait until ``predicate(view)`` holds (for tests and the demo)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self.view))


class GroupProjector(ABC):
    """A consumer-group reader whose ``handle`` performs an effect and acknowledges.

    When ``handle`` raises (anything but a lost Redis connection), the batch
    stays pending; it comes back through the periodic claim, one entry at a
    time, and an entry delivered more than ``max_deliveries`` times is moved
    to the dead-letter stream with an ``entry.dead_lettered`` event.
    """

    name: str = "projector"
    # Entry types ``handle`` acts on (the stream's ``type`` field); the others reach
    # it as ``None``, undecoded. Empty: every type.
    handles: frozenset[bytes] = frozenset()

    def __init__(
        self,
        store: EventStore,
        group: str,
        consumer: str,
        *,
        block_ms: int = 1000,
        batch: int = 256,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        linger_ms: float = LINGER_MS,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.stream = store.keys.events
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.linger_s = linger_ms / 1000
        self.handled = 0
        self.failures = 0
        self.dead_lettered = 0
        self.last_handled_id: str | None = None
        self._idle: Batch = []  # read, nothing to do: acknowledged with the next batch

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @abstractmethod
    async def handle(self, batch: Batch) -> None:
        """Perform the effect for ``batch`` and ``XACK`` every id in it."""

    async def ack(self, ids: list[str]) -> None:
        if ids:
            await self.redis.xack(self.stream, self.group, *ids)

    def _entry(self, raw: RawEntry) -> Entry | None:
        if self.handles and raw[1].get(b"type") not in self.handles:
            return None
        return parse_entry(raw)

    async def _dispatch(self, raws: list[RawEntry], *, defer_idle: bool = False) -> int:
        """Handle ``raws`` as one batch; the number of entries acted on.

        ``defer_idle``: a batch with nothing to act on is kept and acknowledged with
        the next one (one round trip less per read at low rates). A batch that fails
        is left pending (counted as acted on).
        """
        batch: Batch = [(raw[0].decode(), self._entry(raw)) for raw in raws]
        acting = sum(1 for _, entry in batch if entry is not None)
        if defer_idle and not acting and len(self._idle) < self.batch:
            self._idle += batch
            return 0
        batch, self._idle = self._idle + batch, []
        if not batch:
            return 0
        try:
            await self.handle(batch)
        except REDIS_DOWN:
            raise
        except Exception as exc:  # left pending, retried by the claim: not lost
            self.failures += 1
            log.exception("projector_batch_failed", projector=self.name, error=str(exc))
            return max(acting, 1)
        self.handled += len(batch)
        self.last_handled_id = batch[-1][0]
        return acting

    async def _redeliver(self, raws: list[RawEntry]) -> None:
        """Handle entries delivered before, one at a time, dead-lettering the hopeless."""
        for raw in raws:
            entry_id = raw[0].decode()
            info = await self.redis.xpending_range(
                self.stream, self.group, min=entry_id, max=entry_id, count=1
            )
            deliveries = int(info[0]["times_delivered"]) if info else 1
            if deliveries > self.max_deliveries:
                await self._dead_letter(raw, deliveries)
            else:
                await self._dispatch([raw])

    async def _dead_letter(self, raw: RawEntry, deliveries: int) -> None:
        entry_id, fields = raw[0].decode(), raw[1]
        entry = parse_entry(raw)
        error = f"not handled after {deliveries} deliveries"
        log.error("entry_dead_lettered", projector=self.name, entry_id=entry_id, error=error)
        dead_fields: dict[Any, Any] = {
            **fields, "entry_id": entry_id, "projector": self.name, "deliveries": deliveries,
        }  # fmt: skip
        await self.redis.xadd(self.store.keys.dead_letters, dead_fields)
        await self.store.append(
            EntryDeadLettered(
                projector=self.name,
                entry_id=entry_id,
                entry_type=fields.get(b"type", b"").decode(),
                eval_id=entry.event.eval_id_or_empty or None if entry else None,
                deliveries=deliveries,
                error=error,
            )
        )
        await self.ack([entry_id])
        self.dead_lettered += 1

    async def _read(self, start: str, block: int | None) -> list[RawEntry]:
        resp = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch, block=block
        )
        if not resp:
            return []
        raws: list[RawEntry] = resp[0][1]
        # Pending entries that were trimmed away come back as (id, None/{}).
        dead = [r[0].decode() for r in raws if not r[1]]
        await self.ack(dead)
        return [r for r in raws if r[1]]

    async def _drain_own_pending(self) -> None:
        """What this consumer read and did not acknowledge before (a crash, a failure)."""
        after = "0"
        while True:
            raws = await self._read(after, None)
            if not raws:
                return
            await self._redeliver(raws)
            after = raws[-1][0].decode()

    async def _claim_idle(self) -> None:
        """Take over entries pending longer than ``claim_idle_ms`` (any consumer's)."""
        cursor = "0-0"
        while True:
            resp = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=cursor,
                count=self.batch,
            )
            cursor_raw, raws = resp[0], resp[1]
            live = [r for r in raws if r and r[1]]
            if live:
                log.info("pending_claimed", projector=self.name, entries=len(live))
                await self._redeliver(live)
            cursor = cursor_raw.decode() if isinstance(cursor_raw, bytes) else str(cursor_raw)
            if cursor == "0-0":
                return

    async def run(self) -> None:
        await self.ensure_group()
        next_claim = 0.0
        recovered = False
        while True:
            try:
                if not recovered:
                    await self._drain_own_pending()
                    recovered = True
                if time.monotonic() >= next_claim:
                    await self._claim_idle()
                    next_claim = time.monotonic() + self.claim_idle_ms / 2000
                # Holding acknowledgements: block briefly, and send them if nothing comes.
                block = min(IDLE_ACK_MS, self.block_ms) if self._idle else self.block_ms
                raws = await self._read(">", block)
                # Linger only when entries to act on come in bunches (under load):
                # otherwise the next one (a task's outcome) would wait for nothing.
                if await self._dispatch(raws, defer_idle=bool(raws)) > 1:
                    await linger(raws, self.batch, self.linger_s)
            except REDIS_DOWN as exc:
                self.store.redis_state(ok=False)
                log.warning("projector_redis_error", projector=self.name, error=str(exc))
                self._idle = []  # still pending: delivered again
                recovered = False
                await asyncio.sleep(1.0)
