"""Projector runners that act: read the stream through a consumer group, act, acknowledge.

(The status view's runner, which folds every entry in each process, is ``tail.py``.)

* :class:`GroupProjector` reads through a consumer group with
  ``XREADGROUP``; its ``handle`` performs the side effect and acknowledges.
  On start it first re-reads its own pending entries (a crash left them
  unacknowledged), and it periodically takes over entries that another,
  dead consumer left pending for longer than ``claim_idle_ms`` (``XAUTOCLAIM``).
  When Redis answers ``NOGROUP`` (it lost the group: restarted empty, say) it
  creates the group again where ``on_nogroup`` says (from the stream's start
  after a reset, so nothing appended since is skipped) and goes on. One that acts
  only on outcomes (``outcomes_only``: the publisher, the reporter) reads the outcome
  stream (``{<prefix>}:outcomes``), which holds nothing else.
* :meth:`GroupProjector.retire` hands over from a group of the same name on the main
  stream, where those two read before the outcome stream existed: it handles what
  that group still holds and the outcome stream does not, then destroys it.
"""

from __future__ import annotations

import asyncio
import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog

from queue_worker.streams.connection import REDIS_DOWN, REDIS_ERRORS, denied, transient
from queue_worker.streams.entries import RawEntry, parse_entry
from queue_worker.streams.events import Entry, EntryDeadLettered
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)
# After a read that did not fill a batch, wait this long so the next read takes
# what accumulated meanwhile: far fewer round trips under load, for a few ms of lag.
LINGER_MS = 10.0
REFUSED_RETRY_S = 1.0  # how often a batch Redis refused for lack of a permission is tried
# Entries a group projector has nothing to do for are acknowledged with its next
# batch, or after this long without one.
IDLE_ACK_MS = 100


async def linger(raws: Sequence[object], batch: int, linger_s: float) -> None:
    if raws and len(raws) < batch and linger_s > 0:
        await asyncio.sleep(linger_s)


# (entry id, entry); the entry is None when there is nothing to do for it: it is
# unreadable, or of a type the projector does not handle. Every id gets acknowledged.
Batch = list[tuple[str, Entry | None]]


class GroupProjector(ABC):
    """A consumer-group reader whose ``handle`` performs an effect and acknowledges.

    When ``handle`` raises (anything but a lost Redis connection), the batch
    stays pending; it comes back through the periodic claim, one entry at a
    time, and an entry delivered more than ``max_deliveries`` times is moved
    to the dead-letter stream with an ``entry.dead_lettered`` event.

    A refusal for lack of an ACL permission is Redis's, not the entries': the batch is
    tried again in place every ``REFUSED_RETRY_S`` (its delivery count unchanged, so it
    is never dead-lettered for it) and ``refused`` says why until a try goes through.
    """

    name: str = "projector"
    # Entry types ``handle`` acts on (the stream's ``type`` field); the others reach
    # it as ``None``, undecoded. Empty: every type.
    handles: frozenset[bytes] = frozenset()
    # Acts on outcomes only: reads the outcome stream instead of the main one.
    outcomes_only: bool = False

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
        on_nogroup: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.store = store
        self.on_nogroup = on_nogroup  # where to create the group again when Redis lost it
        self.redis = store.redis
        keys = store.keys
        self.stream = keys.outcomes if self.outcomes_only else keys.events
        # Set on a retiring reader of the main stream: entries with a copy in this stream
        # are that stream's readers' to handle, and only acknowledged here.
        self.copied_to: str | None = None
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
        self.recreated = 0  # times Redis had lost the group
        self.retired = False  # retire() destroyed the group (of the main stream)
        self.refused: str | None = None  # a permission Redis denies now (its words)
        self._idle: Batch = []  # read, nothing to do: acknowledged with the next batch

    async def ensure_group(self, start_id: str = "0") -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _recreate_group(self, exc: Exception) -> None:
        """Redis lost the group (``NOGROUP``): create it again where ``on_nogroup`` says
        (``0`` after a reset: every entry of the new stream is new to the group)."""
        start_id = await self.on_nogroup() if self.on_nogroup is not None else "0"
        log.error("consumer_group_recreated", projector=self.name, start_id=start_id,
                  error=str(exc))  # fmt: skip
        await self.ensure_group(start_id)
        self.recreated += 1

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

    async def _drop_copied(self, batch: Batch) -> Batch:
        """``batch`` with nothing to do for the entries that have a copy in
        ``copied_to`` (written since the outcome stream exists: its readers handle them)."""
        if self.copied_to is None:
            return batch
        acting = [entry_id for entry_id, entry in batch if entry is not None]
        if not acting:
            return batch
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in acting:
                pipe.xrange(self.copied_to, entry_id, entry_id, count=1)
            found: list[list[RawEntry]] = await pipe.execute()
        copied = {entry_id for entry_id, raws in zip(acting, found, strict=True) if raws}
        return [(i, None if i in copied else entry) for i, entry in batch]

    async def _dispatch(self, raws: list[RawEntry], *, defer_idle: bool = False) -> int:
        """Handle ``raws`` as one batch; the number of entries acted on.

        ``defer_idle``: a batch with nothing to act on is kept and acknowledged with
        the next one (one round trip less per read at low rates). A batch that fails
        is left pending (counted as acted on).
        """
        batch: Batch = [(raw[0].decode(), self._entry(raw)) for raw in raws]
        batch = await self._drop_copied(batch)
        acting = sum(1 for _, entry in batch if entry is not None)
        if defer_idle and not acting and len(self._idle) < self.batch:
            self._idle += batch
            return 0
        batch, self._idle = self._idle + batch, []
        if not batch:
            return 0
        try:
            while True:
                try:
                    await self.handle(batch)
                    break
                except REDIS_ERRORS as exc:
                    if not denied(exc):
                        raise
                    await self._wait_refused(exc)
            self.refused = None
        except Exception as exc:  # left pending, retried by the claim: not lost
            if isinstance(exc, REDIS_ERRORS) and (transient(exc) or "NOGROUP" in str(exc)):
                raise  # Redis, not the entries: the run loop waits and reads them again
            self.failures += 1
            log.exception("projector_batch_failed", projector=self.name, error=str(exc))
            return max(acting, 1)
        self.handled += len(batch)
        self.last_handled_id = batch[-1][0]
        return acting

    async def _wait_refused(self, exc: BaseException) -> None:
        """Redis denied a permission: say so (``refused``, logged once per reason), wait."""
        reason = f"{type(exc).__name__}: {exc}"
        if reason != self.refused:
            log.error("projector_redis_refused", projector=self.name, error=reason)
        self.refused = reason
        await asyncio.sleep(REFUSED_RETRY_S)

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
        read_id, fields = raw[0].decode(), dict(raw[1])
        entry = parse_entry(raw)
        # The main stream's id: an outcome copy has it as its own id, or (one that had to
        # take an id of its own) in its ``entry_id`` field.
        entry_id = (fields.pop(b"entry_id", None) or raw[0]).decode()
        error = f"not handled after {deliveries} deliveries"
        log.error("entry_dead_lettered", projector=self.name, entry_id=entry_id, error=error)
        dead_fields: dict[Any, Any] = {
            **fields, "entry_id": entry_id, "projector": self.name, "deliveries": deliveries,
            "stream": self.stream,
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
        await self.ack([read_id])
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

    def retiring(self) -> GroupProjector:
        """A reader of this projector's group of the same name on the main stream, for
        :meth:`retire` (its effects and its memory of them shared with this one)."""
        legacy = copy.copy(self)
        legacy.stream, legacy.copied_to = self.store.keys.events, self.stream
        legacy._idle = []
        return legacy

    async def retire(self, poll_s: float = 1.0) -> None:
        """Hand over from a group on the main stream (what an earlier version read before
        the outcome stream existed): handle every outcome it holds, unread or pending
        (a dead consumer's once idle for ``claim_idle_ms``), that has no copy in the
        outcome stream, acknowledge the rest, then destroy the group so it no longer
        holds retention back (``retired`` then says so).

        Run it only once no worker of the earlier version runs: those still read the
        group and would publish or report the copies a second time. A copy that had to
        take an id of its own (the outcome stream was ahead, see ``claims.APPEND``) is not
        recognised here and is handled twice.
        """
        while True:
            try:
                names = {str(g["name"]) for g in await self.store.info_groups(self.stream)}
                if self.group not in names:
                    return
                await self._drain_own_pending()
                while raws := await self._read(">", None):
                    await self._dispatch(raws)
                await self._claim_idle()
                summary = await self.redis.xpending(self.stream, self.group)
                if not summary["pending"]:
                    # Nothing unread that lacks a copy, nothing pending: what is appended
                    # from now on has its copy in the outcome stream.
                    await self.redis.xgroup_destroy(self.stream, self.group)
                    log.warning("legacy_group_retired", projector=self.name,
                                stream=self.stream, group=self.group)  # fmt: skip
                    self.retired = True
                    return
            except REDIS_ERRORS as exc:
                if "NOGROUP" in str(exc):
                    return  # another worker retired it meanwhile
                if denied(exc):  # XGROUP DESTROY not granted, say: wait for the operator
                    await self._wait_refused(exc)
                    continue
                if not transient(exc):
                    raise
                log.warning("projector_redis_error", projector=self.name, error=str(exc))
            await asyncio.sleep(poll_s)

    async def run(self) -> None:
        next_claim = 0.0
        grouped = recovered = False
        while True:
            try:
                if not grouped:
                    await self.ensure_group()
                    grouped = True
                if not recovered:
                    await self._drain_own_pending()
                    recovered = True
                if time.monotonic() >= next_claim:
                    await self._claim_idle()
                    next_claim = time.monotonic() + self.claim_idle_ms / 2000
                # Holding acknowledgements: block briefly, and send them if nothing comes.
                block = min(IDLE_ACK_MS, self.block_ms) if self._idle else self.block_ms
                raws = await self._read(">", block)
                self.refused = None
                # Linger only when entries to act on come in bunches (under load):
                # otherwise the next one (a task's outcome) would wait for nothing.
                if await self._dispatch(raws, defer_idle=bool(raws)) > 1:
                    await linger(raws, self.batch, self.linger_s)
            except REDIS_ERRORS as exc:
                self._idle = []  # still pending: delivered again
                recovered = False
                if transient(exc):
                    if isinstance(exc, REDIS_DOWN):
                        self.store.redis_state(ok=False)
                    log.warning("projector_redis_error", projector=self.name, error=str(exc))
                    await asyncio.sleep(1.0)
                elif "NOGROUP" in str(exc):
                    await self._recreate_group(exc)
                elif denied(exc):
                    await self._wait_refused(exc)
                else:
                    raise  # the supervisor restarts the loop, or gives up
