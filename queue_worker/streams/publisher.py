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

    def __init__(self, store: EventStore, group: str, consumer: str, **options: int) -> None:
        super().__init__(store, group, consumer, **options)
        self.published = 0

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
        async with self.redis.pipeline(transaction=True) as pipe:
            for channel, payload in messages:
                pipe.publish(channel, payload)
            pipe.xack(self.stream, self.group, *[entry_id for entry_id, _ in batch])
            await pipe.execute()
        self.published += len(messages)
