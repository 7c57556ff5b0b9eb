"""Checkpoints of the status view, so that a start folds only what follows the latest one.

The status projector saves its folded view every ``CHECKPOINT_EVERY`` entries (and before
each retention round) under ``{<prefix>}:checkpoint``: a hash holding the id of the last
entry the view covers (``id``) and the view itself (``view``, MessagePack, with the
checkpoint's schema version). A save never replaces a checkpoint that covers more (one
script compares the ids), so replicas may all save. At start-up the latest checkpoint is
loaded and only the entries after its id are folded; the result is the view a fold of the
whole stream gives. Retention never trims above the checkpoint, so the entries it trims
are counted in it and the counters stay exact.

A checkpoint that cannot be used (another schema version, undecodable, or covering
entries past the stream's end: Redis lost data) is ignored and the stream folded in full;
the reason is recorded (``checkpoint.ignored``).
"""

from __future__ import annotations

from typing import cast

import msgspec
import redis.asyncio as aioredis

from queue_worker.streams.connection import RedisClient
from queue_worker.streams.entries import id_key
from queue_worker.streams.keys import Keys
from queue_worker.streams.views import StatusView

CHECKPOINT_VERSION = 1  # bump when StatusView changes in a way old checkpoints cannot fill

# KEYS[1] = the checkpoint hash; ARGV = id, data. Saves unless the stored id is newer.
SAVE = """
local stored = redis.call('HGET', KEYS[1], 'id')
if stored then
  local sms, sseq = string.match(stored, '(%d+)-(%d+)')
  local nms, nseq = string.match(ARGV[1], '(%d+)-(%d+)')
  sms, sseq, nms, nseq = tonumber(sms), tonumber(sseq), tonumber(nms), tonumber(nseq)
  if sms > nms or (sms == nms and sseq >= nseq) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'view', ARGV[2])
return 1
"""


class Checkpoint(msgspec.Struct, frozen=True):
    version: int
    last_id: str
    view: StatusView


class Unusable(Exception):
    """The stored checkpoint cannot be used; the message says why."""


class Checkpoints:
    """Saving and loading the status view's checkpoint."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.key = keys.checkpoint
        self._save = cast(aioredis.Redis, redis).register_script(SAVE)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Checkpoint)

    async def save(self, view: StatusView) -> bool:
        """Checkpoint ``view`` (as of ``view.last_id``); whether it was stored (not when a
        newer checkpoint is there already, or the view has folded nothing)."""
        if view.last_id is None:
            return False
        data = self._encoder.encode(Checkpoint(CHECKPOINT_VERSION, view.last_id, view))
        return bool(await self._save(keys=[self.key], args=[view.last_id, data]))

    async def stored_id(self) -> str | None:
        raw = await self.redis.hget(self.key, "id")  # type: ignore[misc]
        return raw.decode() if isinstance(raw, bytes) else None

    async def load(self, stream_last_id: str | None) -> Checkpoint | None:
        """The stored checkpoint (``None``: there is none). Raises :class:`Unusable` with
        the reason when there is one that cannot be used against a stream that ends at
        ``stream_last_id``."""
        raw = await self.redis.hmget(self.key, ["id", "view"])  # type: ignore[misc]
        stored_id, data = raw
        if stored_id is None and data is None:
            return None
        try:
            checkpoint = self._decoder.decode(data or b"")
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            raise Unusable(f"cannot be decoded ({exc})") from exc
        if checkpoint.version != CHECKPOINT_VERSION:
            raise Unusable(f"schema version {checkpoint.version}, not {CHECKPOINT_VERSION}")
        if checkpoint.view.last_id != checkpoint.last_id:
            raise Unusable("its view does not end at its id")
        if stream_last_id is None or id_key(checkpoint.last_id) > id_key(stream_last_id):
            raise Unusable(
                f"it covers entries up to {checkpoint.last_id}, past the stream's end "
                f"({stream_last_id}): Redis lost data since"
            )
        return checkpoint
