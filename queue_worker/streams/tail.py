"""The status projector: keeps each process's status view folded up to the stream's end.

It starts by replaying the stream, from the latest checkpoint of the view when there is
one (``checkpoint.py``), folds this process's own appends as they land and reads the
stream (``XREAD``) for the rest: see :class:`TailProjector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import structlog

from queue_worker.streams.checkpoint import Checkpoint, Checkpoints, Unusable
from queue_worker.streams.connection import REDIS_DOWN, REDIS_ERRORS, transient
from queue_worker.streams.entries import RawEntry, id_key, parse_entry
from queue_worker.streams.events import CheckpointIgnored, Entry
from queue_worker.streams.projector import LINGER_MS, linger
from queue_worker.streams.store import RECORDING_ERRORS, EventStore
from queue_worker.streams.views import StatusView, apply

log = structlog.get_logger(__name__)

# Own entries kept for the read to fold in their place (see ``TailProjector``); past this
# many the oldest are dropped and read back from the stream instead.
PARKED_MAX = 50_000
# How long the read leaves an entry of this process for its write's reply to fold.
OWN_REPLY_WAIT_S = 0.5
OWN_REPLY_POLL_S = 0.005


class TailProjector:
    """Keeps ``view`` folded up to the stream's last entry.

    This process's own appends are folded as they land, not read back: the store tells
    the projector of each write with the stream's last id before it. When the view is
    folded up to exactly that id, the write's entries (consecutive in the stream) are
    folded at once, from the events in hand. Otherwise another writer's entries (a
    replica, an operator command) came in between: the write's entries are parked, and
    the read folds them in their place when it reaches them. Either way every entry is
    folded once, in stream order, so the view is what a fold of ``XRANGE`` gives. While
    no other writer appends, the read asks for one entry at a time (it only learns that
    something was appended, which was this process): its own entries are not read back.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        block_ms: int = 1000,
        batch: int = 1000,
        linger_ms: float = LINGER_MS,
        on_entry: Sequence[Callable[[Entry], None]] = (),
        checkpoints: Checkpoints | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        self.store = store
        self.view = StatusView()
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self.checkpoint_loaded: str | None = None  # the id of the checkpoint replay began at
        self.checkpoint_ignored: str | None = None  # why a stored checkpoint was not used
        self.checkpoints_saved = 0
        self._unsaved = 0  # entries folded since the last checkpoint
        self.linger_s = linger_ms / 1000
        self.on_entry = list(on_entry)  # called with every entry folded, replay included
        self.block_ms = block_ms
        self.batch = batch
        self.replayed = asyncio.Event()
        self.replay_seconds = 0.0
        self.replay_events = 0
        self.folded_as_written = 0  # own entries folded when their write landed
        self.folded_parked = 0  # own entries folded in their place when the read got there
        self.read_back = 0  # entries decoded from a read (others', and own ones not parked)
        self._parked: dict[str, Entry] = {}
        self._probe = False  # the read asks for one entry: nobody else appended lately
        self._own_seen_at: float | None = None  # when the read first met an untold own entry
        self._changed = asyncio.Event()  # set (and replaced) whenever the view moved
        self._failed: Exception | None = None  # folding a write failed: the loop raises it
        store.listeners.append(self._written)

    def _apply(self, entry: Entry) -> None:
        apply(self.view, entry)
        self._unsaved += 1
        for observe in self.on_entry:
            observe(entry)

    def _moved(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _written(self, before: str | None, entries: list[Entry]) -> None:
        """A write of this process landed (see the class): fold it now, or park it."""
        if not self.replayed.is_set():
            self._park(entries)  # the replay folds them, or the read after it
            return
        folded = self.view.last_id
        if (None if folded in (None, "0-0") else folded) == before and not self._parked:
            try:
                for entry in entries:
                    self._apply(entry)
            except Exception as exc:  # a bug in the fold: the loop raises it (see run)
                self._failed = exc
                raise
            self.folded_as_written += len(entries)
            self._own_seen_at = None
            self._moved()
            return
        self._park(entries)
        self._probe = False  # others' entries come first: read them in batches

    def _park(self, entries: list[Entry]) -> None:
        for entry in entries:
            self._parked[entry.id] = entry
        while len(self._parked) > PARKED_MAX:  # the read decodes them instead
            del self._parked[next(iter(self._parked))]

    def _reply_on_its_way(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """An entry of the write this process has in flight: Redis answered the read before
        the write, whose reply folds it as written in a moment. One that is not told of
        within ``OWN_REPLY_WAIT_S`` (its reply was lost) is read back."""
        store = self.store
        if not store.writing or (
            store.last_id is not None and id_key(entry_id) <= id_key(store.last_id)
        ):
            return False  # written before: told of already (folded, or parked and dropped)
        if fields.get(b"worker_id") != store.worker_id.encode():
            return False
        if fields.get(b"gen") != str(store.generation).encode():
            return False
        now = time.monotonic()
        if self._own_seen_at is None:
            self._own_seen_at = now
        return now - self._own_seen_at < OWN_REPLY_WAIT_S

    async def replay(self) -> None:
        """Fold the stream: from the latest usable checkpoint on, else from its start
        (again from scratch when an earlier try was cut short)."""
        started = time.perf_counter()
        start = "-"
        checkpoint = await self._load_checkpoint()
        self._adopt(StatusView() if checkpoint is None else checkpoint.view)
        if checkpoint is not None:
            self.checkpoint_loaded = checkpoint.last_id
            start = "(" + checkpoint.last_id
        folded = 0
        async for entry in self.store.read_range(start, batch=self.batch):
            self._apply(entry)
            folded += 1
        self._unsaved = folded
        self.replay_seconds = time.perf_counter() - started
        self.replay_events = folded
        if self.checkpoint_ignored is not None:
            await self._record_ignored(self.checkpoint_ignored)
        self.replayed.set()
        log.info(
            "status_replayed",
            events=self.view.events,
            folded=folded,
            checkpoint=self.checkpoint_loaded,
            seconds=round(self.replay_seconds, 3),
        )

    def _adopt(self, view: StatusView) -> None:
        """Make ``self.view`` what ``view`` holds, in place: others hold this view."""
        for name in StatusView.__struct_fields__:
            setattr(self.view, name, getattr(view, name))

    async def _load_checkpoint(self) -> Checkpoint | None:
        if self.checkpoints is None:
            return None
        newest = await self.store.redis.xrevrange(self.store.keys.events, count=1)
        try:
            return await self.checkpoints.load(newest[0][0].decode() if newest else None)
        except Unusable as exc:
            self.checkpoint_ignored = str(exc)
            log.warning("checkpoint_ignored", reason=str(exc))
            return None

    async def _record_ignored(self, reason: str) -> None:
        assert self.checkpoints is not None
        try:
            stored = await self.checkpoints.stored_id()
            await self.store.append(CheckpointIgnored(reason=reason, checkpoint_id=stored))
        except RECORDING_ERRORS as exc:  # logged above already; the fold goes on
            log.warning("checkpoint_ignored_not_recorded", error=str(exc))

    async def save_checkpoint(self) -> bool:
        """Checkpoint the view now (Redis errors are the caller's)."""
        if self.checkpoints is None:
            return False
        saved = await self.checkpoints.save(self.view)
        self._unsaved = 0
        self.checkpoints_saved += saved
        return saved

    async def _maybe_checkpoint(self) -> None:
        if not self.checkpoint_every or self._unsaved < self.checkpoint_every:
            return
        try:
            await self.save_checkpoint()
        except REDIS_ERRORS as exc:  # the next batch tries again
            log.warning("checkpoint_not_saved", error=str(exc))

    async def run(self) -> None:
        if not self.replayed.is_set():
            await self.replay()
        redis = self.store.redis
        while True:
            if self._failed is not None:  # the supervisor records it and restarts the loop
                failed, self._failed = self._failed, None
                raise RuntimeError(f"folding this process's own entries failed: {failed!r}")
            last = self.view.last_id or "0-0"
            try:
                resp = await redis.xread(
                    {self.store.keys.events: last},
                    count=1 if self._probe else self.batch,
                    block=self.block_ms,
                )
            except REDIS_ERRORS as exc:
                if not transient(exc):
                    raise  # the supervisor restarts the loop, or gives up
                if isinstance(exc, REDIS_DOWN):
                    self.store.redis_state(ok=False)
                log.warning("status_projector_redis_error", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self.store.redis_state(ok=True)
            if not resp:
                continue
            raws = resp[0][1]
            if self._fold_read(raws):
                self._moved()
            await self._maybe_checkpoint()
            if self._own_seen_at is not None:  # a write's reply is due: let it fold first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), OWN_REPLY_POLL_S)
            await linger(raws, self.batch, self.linger_s)

    def _fold_read(self, raws: list[RawEntry]) -> bool:
        """Fold what a read returned that the view does not hold yet; whether any was new.

        Entries up to the view's last id were folded as written meanwhile; parked ones are
        folded from the events in hand. Only the rest is decoded.
        """
        folded = id_key(self.view.last_id or "0-0")
        new = False
        for raw in raws:
            entry_id = raw[0].decode()
            if id_key(entry_id) <= folded:
                continue
            entry = self._parked.pop(entry_id, None)
            if entry is not None:
                self.folded_parked += 1
            elif self._reply_on_its_way(entry_id, raw[1]):
                break  # folded as written in a moment; the next read goes on after it
            else:
                entry = parse_entry(raw)
                self.read_back += 1
            new, self._own_seen_at = True, None
            if entry is not None:
                self._apply(entry)
            else:
                self.view.last_id = entry_id
        if self._parked and id_key(next(iter(self._parked))) <= id_key(self.view.last_id or "0-0"):
            self._drop_passed_parked()
        # Nothing new: every entry was this process's own, folded as written. Until another
        # writer shows up, one entry per read says enough (that something was appended).
        self._probe = not new and not self._parked
        return new

    def _drop_passed_parked(self) -> None:
        """Parked entries the read went past (trimmed, say) are not folded twice."""
        folded = id_key(self.view.last_id or "0-0")
        for entry_id in [i for i in self._parked if id_key(i) <= folded]:
            del self._parked[entry_id]

    def rewind(self, stream_last_id: str | None) -> None:
        """After a stream reset: read on from the stream's last id when it is below the
        view's, so entries appended to the new stream are not skipped."""
        self._parked.clear()  # what was written before may be gone: read it back, if kept
        self._probe = False
        last = self.view.last_id
        if last is not None and id_key(stream_last_id or "0-0") < id_key(last):
            log.warning("status_rewound", from_id=last, to_id=stream_last_id)
            self.view.last_id = stream_last_id or "0-0"

    async def wait_folded(self, entry_id: str, timeout_s: float) -> None:
        """Wait until the view has folded the stream up to ``entry_id``."""
        target = id_key(entry_id)
        await self.wait_for(lambda v: id_key(v.last_id or "0-0") >= target, timeout_s)

    async def wait_for(self, predicate: Callable[[StatusView], bool], timeout_s: float) -> None:
        """Wait until ``predicate(view)`` holds (for tests and the demo)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.view):
                await self._changed.wait()
