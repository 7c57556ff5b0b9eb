"""Waking the pull loop when a submission is announced.

The platform's API gateway publishes ``evaluation:queued`` on Redis pub/sub just
before it POSTs the task to the Queue Service. A message on ``WAKE_CHANNEL``
makes the worker poll at once (and again within a few milliseconds, since the
task reaches the queue just after its announcement) instead of waiting out its
idle backoff. The regular polls stay as the fallback: a lost message only costs
latency. Wake-ups are counted (``/status``, ``/metrics``), not appended: they
change no state. What a message says is not read (it is not ours to trust).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from queue_worker.streams.connection import NO_TLS, RedisTls, plain_client, transient

log = structlog.get_logger(__name__)

RECONNECT_MAX_S = 5.0


async def listen(
    redis_url: str, channel: str, wake: Callable[[], None], tls: RedisTls = NO_TLS
) -> None:
    """Call ``wake`` for every message on ``channel``, forever; Redis going away is
    waited out (reconnecting with backoff), never a crash of the loop."""
    delay_s = 0.1
    while True:
        # A plain client of the URL's node: on a Redis Cluster a PUBLISH reaches every node.
        client = plain_client(redis_url, tls)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                log.info("wake_channel_subscribed", channel=channel)
                delay_s = 0.1
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        wake()
        except aioredis.RedisError as exc:
            if not transient(exc):
                raise  # the supervisor restarts the loop, or gives up
            log.warning("wake_channel_lost", channel=channel, error=str(exc), retry_in_s=delay_s)
        except OSError as exc:
            log.warning("wake_channel_lost", channel=channel, error=str(exc), retry_in_s=delay_s)
        finally:
            await client.aclose()
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, RECONNECT_MAX_S)
