"""What the operator commands on the event stream do: ``audit``, ``tail``, ``replay``,
``stream-info`` (their options are in ``queue_worker/commands/stream.py``).

Each reads ``REDIS_URL`` and ``STREAM_PREFIX`` and fails with one line (exit 1)
when Redis cannot be reached or its ACL user lacks a permission they need. What
they print comes from the stream, written by others: control characters are
escaped (``printable``, ``json_printable``).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime

import msgspec
import redis.asyncio as aioredis

from queue_worker.errors import QueueWorkerError
from queue_worker.streams.audit import (
    format_history,
    history,
    history_json,
    json_printable,
    printable,
)
from queue_worker.streams.connection import NO_TLS, RedisDenied, RedisTls, connect, denied
from queue_worker.streams.entries import RawEntry, parse_entry
from queue_worker.streams.events import Entry, Event
from queue_worker.streams.index import TaskIndex
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import fold

_encode = msgspec.json.Encoder().encode
SCALARS = (str, int, float, bool)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _emit(data: object) -> None:
    sys.stdout.write(json_printable(_encode(data)).decode() + "\n")
    sys.stdout.flush()


async def with_store(
    redis_url: str,
    shown_url: str,
    prefix: str,
    work: Callable[[EventStore], Awaitable[int]],
    tls: RedisTls = NO_TLS,
) -> int:
    """Run ``work`` on the store of the stream ``{<prefix>}:events`` at ``redis_url``."""
    redis = await connect(redis_url, shown_url, tls=tls)
    try:
        return await work(EventStore(redis, Keys(prefix), "operator"))
    except aioredis.ResponseError as exc:
        if denied(exc):
            raise RedisDenied(shown_url, exc) from None
        raise
    finally:
        await redis.aclose()


# --- operator actions ------------------------------------------------------------------------


async def record_action(store: EventStore, event: Event) -> int:
    """Append an operator's action (``pause``, ``drain``, ...) and say where it went."""
    [entry_id] = await store.append(event)
    print(f"{entry_id} {event.type} {printable(str(msgspec.to_builtins(event)))}")
    return 0


# --- tail ------------------------------------------------------------------------------------


def matches(entry: Entry, types: list[str], executor: str | None, eval_id: str | None) -> bool:
    """The ``tail`` filters: type globs, an executor (URL or part of it), an eval_id."""
    e = entry.event
    if types and not any(fnmatch.fnmatchcase(e.type, t) for t in types):
        return False
    if eval_id is not None and e.eval_id_or_empty != eval_id:
        return False
    return executor is None or executor in str(getattr(e, "executor", None) or "")


def describe(entry: Entry) -> str:
    """One line for a terminal: time, id, type, worker, eval_id and the event's scalar
    fields, control characters escaped."""
    e = entry.event
    fields = " ".join(
        f"{name}={round(value, 3) if isinstance(value, float) else value}"
        for name, value in msgspec.structs.asdict(e).items()
        if name not in ("v", "eval_id") and isinstance(value, SCALARS)
    )
    eval_id = f" [{e.eval_id_or_empty}]" if e.eval_id_or_empty else ""
    return printable(
        f"{_when(entry.ts)} {entry.id:<17} {e.type:<24} {entry.worker_id}{eval_id} {fields}"
    )


async def follow(
    store: EventStore, *, from_start: bool = False, last_n: int = 0, block_ms: int = 1000
) -> AsyncGenerator[Entry, None]:
    """Every entry appended from now on (or from the start, or the ``last_n`` newest
    first), forever (XREAD BLOCK)."""
    last = "0-0"
    if not from_start:
        newest: list[RawEntry] = await store.redis.xrevrange(
            store.keys.events, count=max(last_n, 1)
        )
        last = newest[0][0].decode() if newest else "0-0"
        if last_n:
            for raw in reversed(newest):
                entry = parse_entry(raw)
                if entry is not None:
                    yield entry
    while True:
        resp = await store.redis.xread({store.keys.events: last}, count=256, block=block_ms)
        for _stream, raws in resp or []:
            for raw in raws:
                last = raw[0].decode()
                entry = parse_entry(raw)
                if entry is not None:
                    yield entry


async def tail(args: argparse.Namespace, store: EventStore) -> int:
    following = printable(f"following {store.keys.events} (Ctrl+C to stop)")
    print(following, file=sys.stderr, flush=True)
    seen = 0
    last_n = args.last or 0
    async with aclosing(follow(store, from_start=args.from_start, last_n=last_n)) as entries:
        async for entry in entries:
            if not matches(entry, args.type or [], args.executor, args.eval_id):
                continue
            if args.json:
                _emit(entry)
            else:
                print(describe(entry), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0


# --- list ------------------------------------------------------------------------------------


async def list_tasks(args: argparse.Namespace, store: EventStore) -> int:
    """The tasks in one state from the task index, latest first (``queue-worker list``)."""
    index = TaskIndex(store.redis, store.keys)
    since_ms = int(start_id(None, args.since).split("-")[0]) if args.since else 0
    rows, _ = await index.page(
        args.state, since_ms=since_ms, limit=args.limit, executor=args.executor
    )
    for row in rows:
        if args.json:
            _emit(row)
        else:
            when = _when(row.since_ms) if row.since_ms is not None else "-"
            print(printable(f"{when}  {row.state:<9}  {row.eval_id}  {row.executor or '-'}"))
    return 0


# --- replay ----------------------------------------------------------------------------------


def start_id(from_id: str | None, since: str | None) -> str:
    """The first stream id to read: ``--from ID``, ``--since ISO-TIME`` (UTC if naive) or ``-``."""
    if from_id is not None:
        return from_id
    if since is not None:
        try:
            when = datetime.fromisoformat(since)
        except ValueError as exc:
            raise QueueWorkerError(f"--since: not an ISO time: {since!r}") from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return f"{int(when.timestamp() * 1000)}-0"
    return "-"


async def replay(args: argparse.Namespace, store: EventStore) -> int:
    start = start_id(args.from_id, args.since)
    try:
        view = fold([e async for e in store.read_range(start)])
    except aioredis.ResponseError as exc:
        if denied(exc):
            raise
        raise QueueWorkerError(f"--from: not a stream id: {start!r} ({exc})") from exc
    text = json_printable(msgspec.json.format(_encode(view), indent=2))
    sys.stdout.write(text.decode() + "\n")
    return 0


# --- stream-info -----------------------------------------------------------------------------


class EntryRef(msgspec.Struct, frozen=True):
    id: str
    time: str


class GroupInfo(msgspec.Struct, frozen=True):
    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str


class StreamInfo(msgspec.Struct, frozen=True):
    key: str
    exists: bool
    length: int
    first: EntryRef | None
    last: EntryRef | None
    groups: list[GroupInfo]
    # The outcome stream (the publisher's and the reporter's groups read it); only on
    # the main stream's.
    outcomes: StreamInfo | None = None


async def _one_stream(store: EventStore, key: str) -> StreamInfo:
    length: int = await store.redis.xlen(key)
    ends: list[EntryRef | None] = []
    for read in (store.redis.xrange, store.redis.xrevrange):
        raws: list[RawEntry] = await read(key, count=1)
        entry_id = raws[0][0].decode() if raws else None
        ends.append(None if entry_id is None else EntryRef(entry_id, _when(_id_ms(entry_id))))
    groups = [
        GroupInfo(
            name=str(g["name"]),
            consumers=int(g.get("consumers", 0)),
            pending=int(g.get("pending", 0)),
            lag=None if g.get("lag") is None else int(g["lag"]),
            last_delivered_id=str(g.get("last-delivered-id", "")),
        )
        for g in await store.info_groups(key)
    ]
    exists = bool(await store.redis.exists(key))
    return StreamInfo(key, exists, length, ends[0], ends[1], groups)


async def stream_info(store: EventStore) -> StreamInfo:
    """The main stream's length, ends and groups, and the outcome stream's."""
    main = await _one_stream(store, store.keys.events)
    outcomes = await _one_stream(store, store.keys.outcomes)
    return msgspec.structs.replace(main, outcomes=outcomes)


def _format_one(info: StreamInfo) -> list[str]:
    if not info.exists:
        return [f"stream {info.key} does not exist (no events yet)"]
    lines = [f"stream {info.key}: {info.length} entries"]
    for label, ref in (("first", info.first), ("last", info.last)):
        lines.append(f"  {label:<5} {ref.id} {ref.time}" if ref else f"  {label:<5} -")
    lines.append(f"  consumer groups: {len(info.groups)}")
    for g in info.groups:
        lag = "?" if g.lag is None else g.lag
        lines.append(
            f"    {g.name:<20} consumers={g.consumers} pending={g.pending} lag={lag} "
            f"last_delivered={g.last_delivered_id}"
        )
    return lines


def format_info(info: StreamInfo) -> str:
    lines = _format_one(info)
    if info.outcomes is not None:
        lines += _format_one(info.outcomes)
    return "\n".join(printable(line) for line in lines)


async def show_stream_info(args: argparse.Namespace, store: EventStore) -> int:
    info = await stream_info(store)
    if args.json:
        _emit(info)
    else:
        print(format_info(info))
    return 0


# --- audit -----------------------------------------------------------------------------------


async def audit(args: argparse.Namespace, store: EventStore) -> int:
    entries = await history(store, args.eval_id)
    if args.json:
        _emit(history_json(entries))
    else:
        print(format_history(args.eval_id, entries))
    return 0 if entries else 1
