"""The task index: each evaluation's entries and state, kept in Redis beside the stream.

The append script (``claims.py``) keeps it, in the same call that appends the entries,
so it is never behind the stream. Every entry that names an evaluation goes into

* ``{<prefix>}:task:<eval_id>``: a sorted set of the ids of its entries (scored by
  their time), so one task's history costs its own entries, not a scan;
* ``{<prefix>}:tasks``: a hash ``eval_id -> "<entry id> <state> <executor>"``, the
  task's latest state (``waiting``, ``in_flight``, ``completed``, ``failed``) as of its
  latest entry, and ``{<prefix>}:tasks:<state>``: one sorted set per state, scored by
  the time the task entered it, for lists and pages.

Only an entry newer than the one a task's state came from changes that state. Retention
trims the index with the stream (:meth:`TaskIndex.forget_before`): a task whose entries
are all gone leaves the index.

Before the append script kept it, a projector did, through the consumer group ``index``.
A worker that finds that group (left by an earlier version, or by a replica of it during
a rolling upgrade) indexes what the group had not read yet and removes the group
(:meth:`TaskIndex.retire_legacy_group`), so it holds back neither retention nor anything
else.
"""

from __future__ import annotations

from typing import cast

import msgspec
import redis.asyncio as aioredis
import structlog

from queue_worker.streams.claims import INDEX_ENTRY, index_op
from queue_worker.streams.connection import RedisClient
from queue_worker.streams.entries import id_key
from queue_worker.streams.events import Entry
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

STATES = ("waiting", "in_flight", "completed", "failed")
MAX_TASK_ENTRIES = 10_000  # one task's history is read up to this many entries
FORGET_BATCH = 1000
CATCH_UP_BATCH = 500

# The catch-up of entries the legacy group had not read: KEYS[1] = the state hash;
# ARGV[1] = key tag; then per entry: id, ms, eval_id, state, executor.
INDEX = (
    INDEX_ENTRY
    + """
for i = 2, #ARGV, 5 do
  index_entry(ARGV[1], KEYS[1], ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4])
end
return 0
"""
)


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """One task's latest state in the index."""

    eval_id: str
    state: str
    executor: str | None
    entry_id: str  # the entry it came from
    since_ms: int | None = None  # when it entered the state (lists only)


def _parse_state(eval_id: str, raw: bytes | str | None) -> TaskState | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    entry_id, state, executor = [*text.split(" ", 2), "", ""][:3]
    return TaskState(eval_id=eval_id, state=state, executor=executor or None, entry_id=entry_id)


class TaskIndex:
    """Reads of the index (and the retention of it)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def state(self, eval_id: str) -> TaskState | None:
        return _parse_state(eval_id, await self.redis.hget(self.keys.tasks, eval_id))  # type: ignore[misc]

    async def entry_ids(self, eval_id: str) -> list[str]:
        """The ids of the task's indexed entries, oldest first."""
        raws = await self.redis.zrange(self.keys.task(eval_id), 0, MAX_TASK_ENTRIES - 1)
        return sorted((r.decode() for r in raws), key=id_key)

    async def history(self, store: EventStore, eval_id: str) -> list[Entry]:
        """The task's entries still in the stream (retention may have trimmed some);
        empty when the index does not know it."""
        ids = await self.entry_ids(eval_id)
        if not ids:
            return []
        return [e for e in await store.read_ids(ids) if e.event.eval_id_or_empty == eval_id]

    async def retire_legacy_group(self, store: EventStore) -> int:
        """Index what the legacy ``index`` group had not read, then remove the group
        (see the module). Returns how many entries were indexed (0: no such group)."""
        group = next(
            (g for g in await store.info_groups() if g.get("name") == self.keys.index_group), None
        )
        if group is None:
            return 0
        start = "(" + str(group["last-delivered-id"])
        if group.get("pending"):
            start = await store.oldest_pending(self.keys.index_group) or start
        script = cast(aioredis.Redis, self.redis).register_script(INDEX)
        indexed, args = 0, [self.keys.tag]
        async for entry in store.read_range(start):
            if eval_id := entry.event.eval_id_or_empty:
                state, executor = index_op(entry.event)
                args += [entry.id, str(entry.ts), eval_id, state, executor]
                indexed += 1
            if len(args) > 5 * CATCH_UP_BATCH:
                await script(keys=[self.keys.tasks], args=args)
                args = [self.keys.tag]
        if len(args) > 1:
            await script(keys=[self.keys.tasks], args=args)
        await self.redis.xgroup_destroy(self.keys.events, self.keys.index_group)
        log.info("legacy_index_group_retired", indexed=indexed, group=self.keys.index_group)
        return indexed

    async def page(
        self,
        state: str,
        *,
        since_ms: int = 0,
        limit: int = 50,
        cursor: tuple[int, str] | None = None,
        executor: str | None = None,
    ) -> tuple[list[TaskState], tuple[int, str] | None]:
        """Tasks in ``state``, newest first, entered at ``since_ms`` or later; ``cursor``
        continues a page (the last row's ``(since_ms, eval_id)``). Returns the rows and
        the next cursor (``None``: no more)."""
        key = self.keys.tasks_in(state)
        top: str = "+inf" if cursor is None else f"({cursor[0] + 1}"
        rows: list[TaskState] = []
        scanned, batch, offset = 0, max(limit * 2, 50), 0
        seen: tuple[int, str] | None = None  # the last member looked at
        while scanned < limit * 20:
            raws = await self.redis.zrevrangebyscore(
                key, top, since_ms, start=offset, num=batch, withscores=True
            )
            if not raws:
                return rows, None
            if cursor is not None:  # entries at the cursor's own time, after its eval_id
                raws = [
                    (m, s)
                    for m, s in raws
                    if int(s) < cursor[0] or (int(s) == cursor[0] and m.decode() < cursor[1])
                ]
            offset += batch
            scanned += len(raws)
            ids = [m.decode() for m, _ in raws]
            states = await self.redis.hmget(self.keys.tasks, ids) if ids else []  # type: ignore[misc]
            for (member, score), raw in zip(raws, states, strict=True):
                seen = (int(score), member.decode())
                found = _parse_state(member.decode(), raw)
                if found is None or found.state != state:
                    continue  # moved on since (its sorted set is updated in the same script)
                if executor is not None and found.executor != executor:
                    continue
                rows.append(msgspec.structs.replace(found, since_ms=int(score)))
                if len(rows) == limit:
                    return rows, seen
        # Scanned enough for one answer (a filter that matches little): the client goes on
        # from what was looked at.
        return rows, seen

    async def forget_before(self, below_id: str) -> int:
        """After retention trimmed the stream below ``below_id``: drop every task whose
        latest entry is older (its history is gone), and the trimmed ids of the others
        are left to be skipped on read. Returns how many tasks were dropped."""
        below_ms = id_key(below_id)[0]
        dropped = 0
        for state in STATES:
            key, offset = self.keys.tasks_in(state), 0
            while True:
                members = await self.redis.zrangebyscore(
                    key, "-inf", f"({below_ms}", start=offset, num=FORGET_BATCH
                )
                if not members:
                    break
                ids = [m.decode() for m in members]
                states = await self.redis.hmget(self.keys.tasks, ids)  # type: ignore[misc]
                gone = [
                    i
                    for i, raw in zip(ids, states, strict=True)
                    if (s := _parse_state(i, raw)) is None or id_key(s.entry_id) < id_key(below_id)
                ]
                if gone:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zrem(key, *gone)
                        pipe.hdel(self.keys.tasks, *gone)
                        pipe.delete(*(self.keys.task(i) for i in gone))
                        await pipe.execute()
                offset += len(ids) - len(gone)  # still indexed: step over them
                dropped += len(gone)
        return dropped
