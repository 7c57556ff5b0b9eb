"""The publisher projector: terminal events become Redis pub/sub messages.

For each batch it sends the ``PUBLISH`` commands and the ``XACK`` of the
whole batch in one ``MULTI``: a crash either publishes and acknowledges a
batch, or neither, so no message is sent twice nor skipped.
"""

from __future__ import annotations

from typing import Any

import msgspec

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


def message_for(event: ev.Event) -> tuple[str, bytes] | None:
    """The (channel, payload) an event is published as, or ``None``."""
    match event:
        case ev.TaskCompleted():
            return COMPLETED_CHANNEL, _encode(CompletedMessage(event.eval_id, event.result))
        case ev.TaskFailed():
            return FAILED_CHANNEL, _encode(FailedMessage(event.eval_id, event.error, event.result))
        case ev.TaskRejected(eval_id=str(eval_id)):
            error = f"invalid task payload: {event.reason}"
            return FAILED_CHANNEL, _encode(FailedMessage(eval_id, error, None))
    return None


class Publisher(GroupProjector):
    name = "publisher"

    def __init__(self, store: EventStore, group: str, consumer: str, **options: int) -> None:
        super().__init__(store, group, consumer, **options)
        self.published = 0

    async def handle(self, batch: Batch) -> None:
        messages = [m for _, entry in batch if entry and (m := message_for(entry.event))]
        async with self.redis.pipeline(transaction=True) as pipe:
            for channel, payload in messages:
                pipe.publish(channel, payload)
            pipe.xack(self.stream, self.group, *[entry_id for entry_id, _ in batch])
            await pipe.execute()
        self.published += len(messages)
