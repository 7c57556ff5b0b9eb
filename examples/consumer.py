"""An example consumer of the queue worker's event stream, with its own consumer group.

It needs only redis-py (no queue_worker import): it creates its group (from
the first entry), re-reads its own pending entries after a restart, then reads
new ones, prints each as one JSON line and acknowledges it.

    python examples/consumer.py --group my-service [--count N]

REDIS_URL and STREAM_PREFIX are read like the worker reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import redis.asyncio as aioredis


def stream_key(prefix: str) -> str:
    return f"{{{prefix}}}:events"


async def ensure_group(redis: aioredis.Redis, key: str, group: str) -> None:
    """``XGROUP CREATE <key> <group> 0 MKSTREAM``; an existing group is fine."""
    try:
        await redis.xgroup_create(key, group, id="0", mkstream=True)
    except aioredis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def decode(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The flat fields of an entry, with ``data`` decoded from JSON."""
    return {
        "id": entry_id,
        "type": fields.get("type"),
        "eval_id": fields.get("eval_id") or None,
        "worker_id": fields.get("worker_id"),
        "ts": int(fields.get("ts", "0")),
        "data": json.loads(fields.get("data", "null")),
    }


async def consume(args: argparse.Namespace) -> int:
    redis = aioredis.Redis.from_url(args.redis_url, decode_responses=True)
    key = stream_key(args.prefix)
    seen = 0
    try:
        await ensure_group(redis, key, args.group)
        start = "0"  # first our own pending entries (delivered before a crash), then new ones
        while args.count is None or seen < args.count:
            want = 100 if args.count is None else min(100, args.count - seen)
            block = None if start == "0" else args.block_ms
            resp = await redis.xreadgroup(
                args.group, args.consumer, {key: start}, count=want, block=block
            )
            entries = resp[0][1] if resp else []
            if start == "0" and not entries:
                start = ">"
                continue
            for entry_id, fields in entries:
                print(json.dumps(decode(entry_id, fields)), flush=True)  # the "effect"
            if entries:  # acknowledge only after the effect: at-least-once delivery
                await redis.xack(key, args.group, *[entry_id for entry_id, _ in entries])
                seen += len(entries)
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
        print(f"consumer: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Read the event stream with a consumer group.")
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379")
    )
    parser.add_argument("--prefix", default=os.environ.get("STREAM_PREFIX", "queue-worker"))
    parser.add_argument("--group", default="example-consumer", help="consumer group name")
    parser.add_argument("--consumer", default="consumer-1", help="consumer name in the group")
    parser.add_argument("--count", type=int, help="stop after N entries (default: run forever)")
    parser.add_argument("--block-ms", type=int, default=5000, help="XREADGROUP BLOCK time")
    try:
        return asyncio.run(consume(parser.parse_args()))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
