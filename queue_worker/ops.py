"""Operator commands on the event stream: ``tail``, ``replay``, ``stream-info``.

Each reads ``REDIS_URL`` and ``STREAM_PREFIX`` and fails with one line (exit 1)
when Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime

import msgspec
import redis.asyncio as aioredis

from queue_worker.config import Settings
from queue_worker.errors import QueueWorkerError
from queue_worker.streams.audit import format_history, history, history_json
from queue_worker.streams.connection import open_redis
from queue_worker.streams.events import Entry
from queue_worker.streams.keys import Keys
from queue_worker.streams.store import EventStore, RawEntry, parse_entry
from queue_worker.streams.views import fold

_encode = msgspec.json.Encoder().encode
SCALARS = (str, int, float, bool)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _emit(data: object) -> None:
    sys.stdout.write(_encode(data).decode() + "\n")
    sys.stdout.flush()


async def _with_store(work: Callable[[EventStore], Awaitable[int]]) -> int:
    settings = Settings.from_env()
    try:
        redis = await open_redis(settings.redis_url)
        try:
            return await work(EventStore(redis, Keys(settings.stream_prefix), settings.worker_id))
        finally:
            await redis.aclose()
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
        raise QueueWorkerError(
            f"cannot reach Redis at {settings.redacted_redis_url()} (REDIS_URL): {exc}"
        ) from exc


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
    """One readable line: time, id, type, worker, eval_id and the event's scalar fields."""
    e = entry.event
    fields = " ".join(
        f"{name}={round(value, 3) if isinstance(value, float) else value}"
        for name, value in msgspec.structs.asdict(e).items()
        if name not in ("v", "eval_id") and isinstance(value, SCALARS)
    )
    eval_id = f" [{e.eval_id_or_empty}]" if e.eval_id_or_empty else ""
    return f"{_when(entry.ts)} {entry.id:<17} {e.type:<24} {entry.worker_id}{eval_id} {fields}"


async def follow(
    store: EventStore, *, from_start: bool = False, block_ms: int = 1000
) -> AsyncGenerator[Entry, None]:
    """Every entry appended from now on (or from the start), forever (XREAD BLOCK)."""
    last = "0-0"
    if not from_start:
        newest: list[RawEntry] = await store.redis.xrevrange(store.keys.events, count=1)
        last = newest[0][0].decode() if newest else "0-0"
    while True:
        resp = await store.redis.xread({store.keys.events: last}, count=256, block=block_ms)
        for _stream, raws in resp or []:
            for raw in raws:
                last = raw[0].decode()
                entry = parse_entry(raw)
                if entry is not None:
                    yield entry


async def _tail(args: argparse.Namespace, store: EventStore) -> int:
    print(f"following {store.keys.events} (Ctrl+C to stop)", file=sys.stderr, flush=True)
    seen = 0
    async with aclosing(follow(store, from_start=args.from_start)) as entries:
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


async def _replay(args: argparse.Namespace, store: EventStore) -> int:
    start = start_id(args.from_id, args.since)
    try:
        view = fold([e async for e in store.read_range(start)])
    except aioredis.ResponseError as exc:
        raise QueueWorkerError(f"--from: not a stream id: {start!r} ({exc})") from exc
    sys.stdout.write(msgspec.json.format(_encode(view), indent=2).decode() + "\n")
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


async def stream_info(store: EventStore) -> StreamInfo:
    key = store.keys.events
    length = await store.length()
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
        for g in await store.info_groups()
    ]
    exists = bool(await store.redis.exists(key))
    return StreamInfo(key, exists, length, ends[0], ends[1], groups)


def format_info(info: StreamInfo) -> str:
    if not info.exists:
        return f"stream {info.key} does not exist (no events yet)"
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
    return "\n".join(lines)


async def _stream_info(args: argparse.Namespace, store: EventStore) -> int:
    info = await stream_info(store)
    if args.json:
        _emit(info)
    else:
        print(format_info(info))
    return 0


# --- audit -----------------------------------------------------------------------------------


async def _audit(args: argparse.Namespace, store: EventStore) -> int:
    entries = await history(store, args.eval_id)
    if args.json:
        _emit(history_json(entries))
    else:
        print(format_history(args.eval_id, entries))
    return 0 if entries else 1


# --- commands --------------------------------------------------------------------------------


def _command(
    work: Callable[[argparse.Namespace, EventStore], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(_with_store(lambda store: work(args, store)))

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``audit``, ``tail``, ``replay`` and ``stream-info`` commands."""
    env = "Reads REDIS_URL and STREAM_PREFIX."
    audit = subparsers.add_parser(
        "audit",
        help="print one evaluation's history from the stream",
        description="Print every stream event of one evaluation, oldest first, with the time "
        f"between steps. Exits 1 when there is none. {env}",
    )
    audit.add_argument("eval_id", metavar="EVAL_ID")
    audit.add_argument("--json", action="store_true", help="print the entries as JSON")
    audit.set_defaults(func=_command(_audit))
    tail = subparsers.add_parser(
        "tail",
        help="follow the event stream live, one line per entry",
        description=f"Follow the event stream (XREAD BLOCK) and print each entry. {env}",
    )
    tail.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        help="only this event type; a glob like 'task.*' works; repeat for several",
    )
    tail.add_argument("--executor", help="only events about this executor (its URL or part of it)")
    tail.add_argument("--eval-id", help="only events of this evaluation")
    tail.add_argument(
        "--from-start", action="store_true", help="start at the first entry, not the next one"
    )
    tail.add_argument("--count", type=int, metavar="N", help="stop after N matching entries")
    tail.add_argument("--json", action="store_true", help="print each entry as one JSON line")
    tail.set_defaults(func=_command(_tail))

    replay = subparsers.add_parser(
        "replay",
        help="rebuild the status view from the stream and print it as JSON",
        description="Fold the stream (from its start, --from ID or --since TIME) into the status "
        f"view, as the worker does on start, and print it as JSON. {env}",
    )
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_id", metavar="ID", help="first stream id to fold")
    start.add_argument(
        "--since", metavar="ISO-TIME", help="fold entries from this time on (UTC unless given)"
    )
    replay.set_defaults(func=_command(_replay))

    info = subparsers.add_parser(
        "stream-info",
        help="the stream's length, first and last entry, consumer groups with pending and lag",
        description=f"Describe the event stream and its consumer groups. {env}",
    )
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_command(_stream_info))
