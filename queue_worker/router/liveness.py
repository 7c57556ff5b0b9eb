"""This worker's liveness in the fleet: generation, heartbeat, fence, and Redis resets.

* **Generation.** Every start of a worker id bumps ``{<prefix>}:generation:<id>``;
  the stream's append script stamps it on every entry and refuses every entry of a
  generation that was fenced. A start fences the earlier generations of its own id.
* **Format.** The start also records ``"<stream format> <package version>"`` in
  ``{<prefix>}:formats`` for peers to read (``router/formats.py``); a clean stop removes it.
* **Heartbeat.** Every ``HEARTBEAT_INTERVAL_S`` the liveness key
  ``{<prefix>}:alive:<id>`` is set to the generation with a ``DEAD_AFTER_S`` TTL, by
  a script that refuses when a peer took this generation over.
* **Fence.** When no heartbeat has gone through for half of ``DEAD_AFTER_S`` (and at
  least 1.5 heartbeat intervals), this
  worker stops dispatching, pulling, renewing leases and publishing (:attr:`ok` is
  false) *before* a peer may see its key expire and take it over; it goes on when
  a heartbeat passes again. A worker that was taken over anyway finds out from the
  script (``FENCED``): its in-flight tasks now belong to the peer, and it exits.
* **Redis resets.** ``{<prefix>}:epoch`` is set once per Redis data set. Each
  heartbeat also reads it and the stream's last id: the key gone or changed, the
  stream gone, or its last id below the last one this worker appended, means that
  Redis lost data (restarted empty, or a failover to a replica that missed writes);
  ``on_reset`` is then called (it re-records what this worker has in flight).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import cast

import redis.asyncio as aioredis
import structlog

from queue_worker import __version__
from queue_worker.streams.claims import WorkerFenced
from queue_worker.streams.connection import REDIS_DOWN, REDIS_ERRORS
from queue_worker.streams.entries import id_key
from queue_worker.streams.keys import STREAM_FORMAT
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

# KEYS: generation, fenced, alive, epoch, formats. ARGV: worker, ttl_ms, a new epoch value,
# "<stream format> <package version>".
START = """
local gen = redis.call('INCR', KEYS[1])
local fenced = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if fenced < gen - 1 then redis.call('HSET', KEYS[2], ARGV[1], gen - 1) end
redis.call('SET', KEYS[3], gen, 'PX', ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'NX')
redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
return {gen, redis.call('GET', KEYS[4])}
"""

# KEYS: alive, fenced, generation, epoch, stream. ARGV: worker, generation, ttl_ms.
HEARTBEAT = """
local fenced = redis.call('HGET', KEYS[2], ARGV[1])
if fenced and tonumber(fenced) >= tonumber(ARGV[2]) then
  return redis.error_reply('FENCED worker ' .. ARGV[1] .. ' generation ' .. ARGV[2] ..
    ' was taken over by a peer')
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[3], ARGV[2])
end
local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
return {redis.call('GET', KEYS[4]) or '', last[1] and last[1][1] or ''}
"""

# KEYS: epoch. ARGV: the epoch this worker saw ('' for none), a new value. Replaced
# only if it is still what this worker saw; else the value a peer set is returned.
RENEW_EPOCH = """
local now = redis.call('GET', KEYS[1])
if (now == false and ARGV[1] == '') or now == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return now
"""

FENCE_FRACTION = 0.5  # of DEAD_AFTER_S without a heartbeat before dispatching stops
# ... but never less than this many heartbeat intervals: a beat that is merely on time
# must not fence (DEAD_AFTER_S may be as short as two intervals).
FENCE_MIN_BEATS = 1.5


def new_epoch() -> str:
    return f"{uuid.uuid4().hex[:16]}:{time.time_ns() // 1_000_000}"


class Liveness:
    """Keeps this worker's liveness key and generation; tells whether it may act."""

    def __init__(
        self,
        store: EventStore,
        *,
        heartbeat_interval_s: float,
        dead_after_s: float,
        on_reset: Callable[[str, str | None], None] | None = None,
        on_taken_over: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.worker_id = store.worker_id
        self.interval_s = heartbeat_interval_s
        self.ttl_ms = int(dead_after_s * 1000)
        self.fence_after_s = max(
            dead_after_s * FENCE_FRACTION, heartbeat_interval_s * FENCE_MIN_BEATS
        )
        self.on_reset = on_reset
        self.on_taken_over = on_taken_over
        self.generation = 0
        self.epoch: str | None = None
        self.last_ok = 0.0  # monotonic: when the last heartbeat that went through was sent
        self.taken_over: str | None = None
        self.resets = 0
        self.reset_at: float | None = None  # monotonic: when the last reset was found
        self._ok = asyncio.Event()
        self._fence_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        redis = cast(aioredis.Redis, store.redis)  # RedisCluster registers scripts too
        self._start = redis.register_script(START)
        self._beat = redis.register_script(HEARTBEAT)
        self._renew_epoch = redis.register_script(RENEW_EPOCH)

    # --- state -------------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        """Whether this worker may dispatch, pull, renew leases and publish right now."""
        return self._ok.is_set()

    @property
    def fenced_for_s(self) -> float | None:
        """How long the heartbeat has been late (``None`` while it is not)."""
        if self.ok:
            return None
        return round(time.monotonic() - self.last_ok, 3)

    def problem(self) -> str | None:
        """Why this worker may not act, for ``/health``; ``None`` when it may."""
        if self.taken_over is not None:
            return f"taken over: {self.taken_over}"
        if not self.ok:
            return (
                f"fenced: the liveness key was not refreshed for {self.fenced_for_s}s "
                f"(dispatching stops after {self.fence_after_s:g}s, before peers may take over)"
            )
        return None

    async def wait_ok(self) -> None:
        """Return once this worker may act; raises :class:`WorkerFenced` if taken over."""
        while not self._ok.is_set():
            if self.taken_over is not None:
                raise WorkerFenced(self.taken_over)
            await self._ok.wait()
        if self.taken_over is not None:
            raise WorkerFenced(self.taken_over)

    def _beat_ok(self, sent_at: float) -> None:
        self.last_ok = sent_at
        if not self._ok.is_set():
            if self.generation and sent_at:
                log.info("liveness_refreshed", generation=self.generation)
            self._ok.set()
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        loop = asyncio.get_running_loop()
        self._fence_timer = loop.call_at(sent_at + self.fence_after_s, self._check_fence)

    def _check_fence(self) -> None:
        late_s = time.monotonic() - self.last_ok
        if late_s >= self.fence_after_s and self._ok.is_set():
            log.error("fenced_locally", late_s=round(late_s, 3), generation=self.generation)
            self._ok.clear()

    def _taken_over(self, reason: str) -> None:
        if self.taken_over is not None:
            return
        self.taken_over = reason
        self.store.fenced = True
        log.error("worker_taken_over", reason=reason, generation=self.generation)
        self._ok.set()  # wake the waiters: they raise WorkerFenced
        self._ok.clear()
        if self.on_taken_over is not None:
            self.on_taken_over(reason)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take a new generation (fencing this id's earlier ones) and the first heartbeat."""
        sent_at = time.monotonic()
        k = self.keys
        gen, epoch = await self._start(
            keys=[
                k.generation(self.worker_id),
                k.fenced,
                k.alive(self.worker_id),
                k.epoch,
                k.formats,
            ],
            args=[self.worker_id, self.ttl_ms, new_epoch(), f"{STREAM_FORMAT} {__version__}"],
        )
        self.generation = int(gen)
        self.store.generation = self.generation
        self.epoch = epoch.decode()
        self._beat_ok(sent_at)
        log.info("worker_generation", worker_id=self.worker_id, generation=self.generation)

    async def stop(self) -> None:
        """A clean stop: remove the liveness key, so peers need not wait for its expiry
        (and the recorded format, see ``router/formats.py``)."""
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        if self.taken_over is not None:
            return
        try:
            await self.store.redis.delete(self.keys.alive(self.worker_id))
            await self.store.redis.hdel(self.keys.formats, self.worker_id)  # type: ignore[misc]
        except REDIS_ERRORS as exc:
            log.warning("liveness_key_left", error=str(exc))

    async def run(self) -> None:
        """Beat every ``HEARTBEAT_INTERVAL_S`` until taken over (or cancelled)."""
        next_at = time.monotonic()
        while self.taken_over is None:
            next_at = max(next_at + self.interval_s, time.monotonic())
            self._wake.clear()
            try:
                async with asyncio.timeout(max(next_at - time.monotonic(), 0)):
                    await self._wake.wait()
            except TimeoutError:
                pass
            await self.beat()

    def reset_within(self, window_s: float) -> bool:
        """Whether a reset was found in the last ``window_s``."""
        return self.reset_at is not None and time.monotonic() - self.reset_at < window_s

    async def beat_now(self) -> bool:
        """Beat at once (a reader saw NOGROUP, say); whether Redis lost data, as far as
        this beat (or a reset found since the last one) can tell."""
        before = self.resets
        await self.beat()
        return self.resets != before

    async def beat(self) -> None:
        """One heartbeat; Redis errors are logged and leave the fence to decide."""
        async with self._lock:
            if self.taken_over is not None:
                return
            sent_at = time.monotonic()
            # Only ids whose append was answered before this beat was sent are surely in
            # what the script reads: a later append may be answered before the beat is.
            appended = self.store.last_id
            k = self.keys
            try:
                epoch, last = await self._beat(
                    keys=[
                        k.alive(self.worker_id),
                        k.fenced,
                        k.generation(self.worker_id),
                        k.epoch,
                        k.events,
                    ],
                    args=[self.worker_id, self.generation, self.ttl_ms],
                )
                self.store.note_write_ok()
                self._beat_ok(sent_at)
                reset = await self._detect_reset(epoch.decode(), last.decode() or None, appended)
            except aioredis.ResponseError as exc:
                if str(exc).startswith("FENCED"):
                    self._taken_over(str(exc))
                    return
                log.warning("heartbeat_refused", error=str(exc))
                self.store.write_refused(exc)  # out of memory, read-only: pull nothing
                return
            except REDIS_ERRORS as exc:
                if isinstance(exc, REDIS_DOWN):
                    self.store.redis_state(ok=False)
                log.warning("heartbeat_failed", error=str(exc))
                return
        if reset is not None and self.on_reset is not None:
            self.on_reset(*reset)

    async def _detect_reset(
        self, epoch: str, stream_last: str | None, appended: str | None
    ) -> tuple[str, str | None] | None:
        """Compare what Redis holds with what this worker wrote (up to ``appended``); on
        a loss, the reason and the stream's last id (after renewing or adopting the epoch)."""
        if not epoch:
            reason, renew_from = "Redis lost its data: the epoch key is gone", ""
        elif epoch != self.epoch:
            reason, renew_from = "Redis lost its data: another worker found it", None
        elif appended is not None and stream_last is None:
            reason = f"the stream vanished (this worker had appended up to {appended})"
            renew_from = epoch
        elif appended is not None and id_key(stream_last or "0-0") < id_key(appended):
            reason = f"the stream went back from {appended} to {stream_last}"
            renew_from = epoch
        else:
            return None
        if renew_from is None:
            self.epoch = epoch  # a peer renewed it: adopt it
        else:  # peers see the change and handle the loss too
            renewed = await self._renew_epoch(
                keys=[self.keys.epoch], args=[renew_from, new_epoch()]
            )
            self.epoch = renewed.decode()
        self.resets += 1
        self.reset_at = time.monotonic()
        log.error("redis_reset_detected", reason=reason, stream_last_id=stream_last)
        return reason, stream_last
