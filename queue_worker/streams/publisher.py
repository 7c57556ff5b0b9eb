"""The publisher projector: terminal events become Redis pub/sub messages.

For each batch it sends the ``PUBLISH`` commands and the ``XACK`` of the
whole batch as one atomic unit: a crash either publishes and acknowledges a
batch, or neither, so no message is sent twice nor skipped. Only the entries
still pending for this consumer count: an entry another consumer claimed
meanwhile (``XAUTOCLAIM`` after ``CLAIM_IDLE_MS``) is left to that consumer. The unit is a
Lua script rather than ``MULTI``: as atomic, one round trip, and it also runs
on Redis Cluster, where redis-py refuses ``PUBLISH`` in a transaction. A batch
whose messages add up to more than ``FLUSH_BYTES`` goes out as several such
units, each acknowledging its own entries: Redis writes a script's messages to
the subscribers only after it ends, and disconnects a subscriber whose output
buffer passes 32 MB.

Bounded messages: a message never exceeds ``PUBLISH_MAX_BYTES`` (default 1 MiB).
Above it, the ``output`` and ``error`` strings of its ``result`` (and the failure's
own ``error`` text, when needed) are cut so that the whole message fits, and it
carries ``"truncated": true`` and ``"result_key"``: the Redis key of the full
result (``{<prefix>}:result:<eval_id>``, kept 7 days). A message under the cap is
unchanged: neither field appears. ``truncated`` without ``result_key`` means the
full result is no longer kept.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis

from queue_worker.streams import events as ev
from queue_worker.streams.entries import id_key
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import StatusView

PUBLISH_MAX_BYTES = 1 << 20  # the default of the PUBLISH_MAX_BYTES setting
FLUSH_BYTES = 4 << 20  # messages per atomic PUBLISH + XACK unit, well under 32 MB
RESULT_TTL_S = 7 * 24 * 3600  # how long a full result is kept beside its event
TEXT_FIELDS = ("output", "error")  # the result's strings that are cut to fit
# What a result keeps when even its other fields do not fit: these, when small.
ESSENTIAL_FIELDS = ("eval_id", "status", "exit_code", "executor_id")
ESSENTIAL_MAX_CHARS = 256


class CompletedMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """`evaluation:completed`: the executor's result, as the storage worker reads it.
    Over `PUBLISH_MAX_BYTES`, the result's `output` and `error` are cut to fit, with
    `truncated` and `result_key` (the Redis key of the full result); under it, neither
    field appears.
    """

    eval_id: str
    result: dict[str, Any]
    truncated: bool = False
    result_key: str | None = None


class FailedMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """`evaluation:failed`: `error` is the text existing consumers read. Over
    `PUBLISH_MAX_BYTES`, the texts are cut to fit, with `truncated` and `result_key`
    (the Redis key of the full result, when there is one); under it, neither field
    appears.
    """

    eval_id: str
    error: str
    result: dict[str, Any] | None
    truncated: bool = False
    result_key: str | None = None


Message = CompletedMessage | FailedMessage

_encode = msgspec.json.Encoder().encode

RECENT_MAX = 100_000  # eval_ids remembered as published (for a stream reset)
FORGET_SLACK = 1000  # eval_ids remembered beyond the last scan before the next one

# Only entries still pending for this consumer are published and acknowledged: one that
# another consumer claimed meanwhile (this one was slow, or fenced) is that consumer's to
# publish, so no message goes out twice and none is acknowledged unsent.
# KEYS[1] = stream; ARGV = group, consumer, lowest id, highest id, number of messages,
# then (entry id, channel, payload) per message, then every entry id of the batch.
# Returns the entry ids published.
PUBLISH_AND_ACK = """
local group, consumer = ARGV[1], ARGV[2]
local mine = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, ARGV[3], ARGV[4], 1000000, consumer)) do
  mine[p[1]] = true
end
local last = 5 + 3 * tonumber(ARGV[5])
local ack = {}
for i = last + 1, #ARGV do
  if mine[ARGV[i]] then ack[#ack + 1] = ARGV[i] end
end
-- A channel the ACL user may not publish to (Redis 7 can tell) stops the script before
-- anything is acknowledged: the entries stay pending, and the refusal says which.
if redis.acl_check_cmd then
  for i = 6, last, 3 do
    if mine[ARGV[i]] and not redis.acl_check_cmd('PUBLISH', ARGV[i + 1], ARGV[i + 2]) then
      return redis.error_reply('NOPERM this user has no permissions to publish to ' ..
        'the channel ' .. ARGV[i + 1])
    end
  end
end
-- The write first: a server that refuses it (a read-only replica) stops the script
-- before anything is published (a script is not rolled back).
if #ack > 0 then redis.call('XACK', KEYS[1], group, unpack(ack)) end
local sent = {}
for i = 6, last, 3 do
  if mine[ARGV[i]] then
    redis.call('PUBLISH', ARGV[i + 1], ARGV[i + 2])
    sent[#sent + 1] = ARGV[i]
  end
end
return sent
"""


def _json_len(text: str) -> int:
    """Bytes ``text`` takes inside a JSON message, without its quotes."""
    return len(_encode(text)) - 2


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest start of ``text`` of at most ``max_bytes`` bytes of UTF-8."""
    # max_bytes characters take at least max_bytes bytes: no need to encode more.
    return text[:max_bytes].encode()[:max_bytes].decode(errors="ignore")


def cut_json(text: str, max_bytes: int) -> str:
    """``text`` cut so that it takes at most ``max_bytes`` inside a JSON message
    (escapes such as ``\\n`` or ``\\u0001`` count as what they take)."""
    if _json_len(text) <= max_bytes:
        return text
    target = max_bytes
    while True:
        cut = _cut_utf8(text, target)
        size = _json_len(cut)
        if size <= max_bytes:
            return cut
        target = min(target - 1, target * max_bytes // size)


def _shares(budget: int, sizes: Sequence[int]) -> list[int]:
    """Split ``budget`` bytes between texts of ``sizes``: evenly, and what a short one
    leaves goes to the others."""
    shares = [0] * len(sizes)
    left = budget
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for n, i in enumerate(order):
        shares[i] = min(sizes[i], left // (len(order) - n))
        left -= shares[i]
    return shares


def _essentials(result: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in result.items()
        if k in ESSENTIAL_FIELDS
        and (
            v is None
            or isinstance(v, bool | int | float)
            or (isinstance(v, str) and len(v) <= ESSENTIAL_MAX_CHARS)
        )
    }


def _with_texts(
    message: Message, base: dict[str, Any] | None, texts: list[str], result_key: str | None
) -> Message:
    """``message`` marked truncated, its result ``base`` with ``texts`` as its text fields
    (and, for a failure, the last of ``texts`` as its ``error``)."""
    result = None
    if base is not None:
        names = [f for f in TEXT_FIELDS if isinstance(base.get(f), str)]
        result = {**base, **dict(zip(names, texts, strict=False))}
    if isinstance(message, CompletedMessage):
        return CompletedMessage(message.eval_id, result or {}, True, result_key)
    return FailedMessage(message.eval_id, texts[-1], result, True, result_key)


def fit(message: Message, max_bytes: int, result_key: str | None) -> bytes:
    """``message`` encoded in at most ``max_bytes``: its texts cut as little as needed,
    ``truncated`` set, and ``result_key`` naming where the full result is."""
    base = message.result
    texts = [base[f] for f in TEXT_FIELDS if base is not None and isinstance(base.get(f), str)]
    if isinstance(message, FailedMessage):
        texts.append(message.error)
    empty = [""] * len(texts)
    budget = max_bytes - len(_encode(_with_texts(message, base, empty, result_key)))
    if budget < 0 and base is not None:  # the result's other fields alone are too large
        strings = {f: base[f] for f in TEXT_FIELDS if isinstance(base.get(f), str)}
        base = {**_essentials(base), **strings}
        budget = max_bytes - len(_encode(_with_texts(message, base, empty, result_key)))
    shares = _shares(max(budget, 0), [_json_len(t) for t in texts])
    cut = [cut_json(t, n) for t, n in zip(texts, shares, strict=True)]
    payload = _encode(_with_texts(message, base, cut, result_key))
    if len(payload) > max_bytes:  # only with a cap too small for the ids themselves
        payload = _encode(_with_texts(message, {} if base is not None else None, [""], None))
    return payload


def _message(event: ev.Event, result: dict[str, Any] | None) -> tuple[str, Message] | None:
    match event:
        case ev.TaskCompleted():
            full = result if result is not None else event.result
            return COMPLETED_CHANNEL, CompletedMessage(event.eval_id, full)
        case ev.TaskFailed():
            full_or_none = result if result is not None else event.result
            return FAILED_CHANNEL, FailedMessage(event.eval_id, event.error, full_or_none)
        case ev.TaskRejected(eval_id=str(eval_id)):
            error = f"invalid task payload: {event.reason}"
            return FAILED_CHANNEL, FailedMessage(eval_id, error, None)
    return None


def message_for(
    event: ev.Event,
    result: dict[str, Any] | None = None,
    *,
    max_bytes: int = PUBLISH_MAX_BYTES,
    result_key: str | None = None,
    whole: bool = True,
) -> tuple[str, bytes] | None:
    """The (channel, payload) an event is published as, or ``None``.

    ``result`` replaces the event's own (the full one when the stream's is truncated).
    A payload over ``max_bytes``, or a result that is not ``whole``, is cut to fit
    (:func:`fit`) with ``result_key`` naming where the full result is kept.
    """
    found = _message(event, result)
    if found is None:
        return None
    channel, message = found
    payload = _encode(message)
    if len(payload) <= max_bytes and whole:
        return channel, payload
    return channel, fit(message, max_bytes, result_key)


class Publisher(GroupProjector):
    name = "publisher"
    handles = ev.OUTCOME_TYPES
    outcomes_only = True  # reads the outcome stream

    def __init__(
        self,
        store: EventStore,
        group: str,
        consumer: str,
        *,
        max_message_bytes: int = PUBLISH_MAX_BYTES,
        gate: Callable[[], Awaitable[None]] | None = None,
        on_nogroup: Callable[[], Awaitable[str]] | None = None,
        view: StatusView | None = None,
        **options: int,
    ) -> None:
        super().__init__(store, group, consumer, on_nogroup=on_nogroup, **options)
        self.max_message_bytes = max_message_bytes
        self.gate = gate  # waited for before each publish (a fenced worker publishes nothing)
        self.published = 0
        self.truncated = 0
        # eval_ids (with their entry ids) and entry ids published lately: after Redis lost
        # its last writes, an outcome re-recorded with ``published``, or an entry delivered
        # again because its acknowledgement was lost, is not sent again. Only outcomes the
        # queue has not acknowledged are ever re-recorded: with the status ``view`` the
        # others are forgotten (``forget_acknowledged``), so this memory follows what is
        # unreported, not all that was ever published; ``RECENT_MAX`` bounds it anyway.
        self.view = view
        self.recent: dict[str, str] = {}
        self.recent_entries: dict[str, None] = {}
        self._next_forget = FORGET_SLACK
        # RedisCluster has register_script too; redis-py types it for Redis only.
        redis = cast(aioredis.Redis, self.redis)
        self._publish_and_ack = redis.register_script(PUBLISH_AND_ACK)

    def was_published(self, eval_id: str) -> bool:
        """Whether this process published an outcome of ``eval_id`` lately."""
        return eval_id in self.recent

    def _remember(self, eval_id: str, entry_id: str) -> None:
        self.recent[eval_id] = entry_id
        self.recent_entries[entry_id] = None
        for recent in (self.recent, self.recent_entries):
            if len(recent) > RECENT_MAX:
                del recent[next(iter(recent))]

    def forget_acknowledged(self) -> int:
        """Forget the outcomes the queue has acknowledged: folded into the view and no
        longer unreported there (a reset never re-records those). Returns how many."""
        view = self.view
        if view is None:
            return 0
        kept = {
            eval_id: entry_id
            for eval_id, entry_id in self.recent.items()
            if not view.acknowledged(eval_id, entry_id)
        }
        forgotten = len(self.recent) - len(kept)
        if forgotten:  # in place: a retiring copy (``retiring``) shares these
            still = set(kept.values())
            entries = [i for i in self.recent_entries if i in still]
            self.recent.clear()
            self.recent.update(kept)
            self.recent_entries.clear()
            self.recent_entries.update(dict.fromkeys(entries))
        return forgotten

    async def _payload(self, event: ev.Event) -> tuple[str, bytes] | None:
        """The message of ``event``, within ``max_message_bytes``."""
        if isinstance(event, ev.TaskCompleted | ev.TaskFailed) and event.published:
            return None  # re-recorded after a stream reset; its message went out before
        if not isinstance(event, ev.TaskCompleted | ev.TaskFailed):
            return message_for(event, max_bytes=self.max_message_bytes)
        key = self.store.keys.result(event.eval_id)
        result, kept, whole = event.result, False, True
        if event.truncated:  # the stream holds it cut; the full one is kept beside it
            stored = await self.store.stored_result(event.eval_id)
            kept, whole = stored is not None, stored is not None
            result = stored if stored is not None else event.result
        found = _message(event, result)
        if found is None:
            return None
        channel, message = found
        payload = _encode(message)
        if len(payload) <= self.max_message_bytes and whole:
            return channel, payload
        del payload
        if not kept and result is not None and whole:
            # Too large for a message though whole in the stream (its other fields, or a
            # long failure history): keep it where result_key says, as for a cut one.
            await self.redis.set(key, _encode(result), ex=RESULT_TTL_S, nx=True)
            kept = True
        self.truncated += 1
        return channel, fit(message, self.max_message_bytes, key if kept else None)

    async def _send(self, messages: list[tuple[str, str, bytes, str]], ids: list[str]) -> None:
        """Publish ``messages`` ((entry id, channel, payload, eval_id)) and acknowledge
        ``ids``, those still pending for this consumer, in one script."""
        ids = sorted(ids, key=id_key)
        args: list[str | bytes] = [self.group, self.consumer, ids[0], ids[-1], str(len(messages))]
        for entry_id, channel, payload, _ in messages:
            args += [entry_id, channel, payload]
        args += ids
        sent = {i.decode() for i in await self._publish_and_ack(keys=[self.stream], args=args)}
        for entry_id, _, _, eval_id in messages:
            if entry_id in sent:
                self._remember(eval_id, entry_id)
        self.published += len(sent)

    async def handle(self, batch: Batch) -> None:
        if self.gate is not None:
            await self.gate()
        messages: list[tuple[str, str, bytes, str]] = []
        ids: list[str] = []
        size = 0
        for entry_id, entry in batch:
            ids.append(entry_id)
            again = entry_id in self.recent_entries  # its acknowledgement was lost
            message = None if entry is None or again else await self._payload(entry.event)
            if message is not None and entry is not None:
                messages.append((entry_id, *message, entry.event.eval_id_or_empty))
                size += len(message[1])
            if size >= FLUSH_BYTES:
                await self._send(messages, ids)
                messages, ids, size = [], [], 0
        if ids:
            await self._send(messages, ids)
        if len(self.recent) >= self._next_forget:  # amortised: a scan per FORGET_SLACK kept
            self.forget_acknowledged()
            self._next_forget = 2 * len(self.recent) + FORGET_SLACK
