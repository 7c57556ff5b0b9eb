"""The publisher projector: terminal events become Redis pub/sub messages.

For each batch it sends the ``PUBLISH`` commands and the ``XACK`` of the
whole batch as one atomic unit: a crash either publishes and acknowledges a
batch, or neither, so no message is sent twice nor skipped. The unit is a
Lua script rather than ``MULTI``: as atomic, one round trip, and it also runs
on Redis Cluster, where redis-py refuses ``PUBLISH`` in a transaction.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec
import redis.asyncio as aioredis

from queue_worker.streams import events as ev
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.store import EventStore


class CompletedMessage(msgspec.Struct, frozen=True):
    """``evaluation:completed``: the executor's result, as the storage worker reads it."""

    eval_id: str
    result: dict[str, Any]


class FailedMessage(msgspec.Struct, frozen=True):
    """``evaluation:failed``: ``error`` is the text existing consumers read."""

    eval_id: str
    error: str
    result: dict[str, Any] | None = None


_encode = msgspec.json.Encoder().encode

# KEYS[1] = stream; ARGV = group, number of messages, channel/payload pairs, entry ids.
PUBLISH_AND_ACK = """
local count = tonumber(ARGV[2])
local last = 2 + 2 * count
for i = 3, last, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
if #ARGV > last then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, last + 1))
end
return count
"""


def message_for(event: ev.Event, result: dict[str, Any] | None = None) -> tuple[str, bytes] | None:
    """The (channel, payload) an event is published as, or ``None``.

    ``result`` replaces the event's own (the full one when the stream's is truncated).
    """
    match event:
        case ev.TaskCompleted():
            full = result if result is not None else event.result
            return COMPLETED_CHANNEL, _encode(CompletedMessage(event.eval_id, full))
        case ev.TaskFailed():
            full_or_none = result if result is not None else event.result
            return FAILED_CHANNEL, _encode(FailedMessage(event.eval_id, event.error, full_or_none))
        case ev.TaskRejected(eval_id=str(eval_id)):
            error = f"invalid task payload: {event.reason}"
            return FAILED_CHANNEL, _encode(FailedMessage(eval_id, error, None))
    return None


class Publisher(GroupProjector):
    name = "publisher"
    handles = frozenset({b"task.completed", b"task.failed", b"task.rejected"})

    def __init__(self, store: EventStore, group: str, consumer: str, **options: int) -> None:
        super().__init__(store, group, consumer, **options)
        self.published = 0
        # RedisCluster has register_script too; redis-py types it for Redis only.
        redis = cast(aioredis.Redis, self.redis)
        self._publish_and_ack = redis.register_script(PUBLISH_AND_ACK)

    async def handle(self, batch: Batch) -> None:
        messages = []
        for _, entry in batch:
            if entry is None:
                continue
            event = entry.event
            full = None
            if isinstance(event, ev.TaskCompleted | ev.TaskFailed) and event.truncated:
                full = await self.store.full_result(event)
            message = message_for(event, full)
            if message is not None:
                messages.append(message)
        args: list[str | bytes] = [self.group, str(len(messages))]
        for channel, payload in messages:
            args += [channel, payload]
        args += [entry_id for entry_id, _ in batch]
        await self._publish_and_ack(keys=[self.stream], args=args)
        self.published += len(messages)
