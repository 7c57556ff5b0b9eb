"""``GET /health`` of one executor, and what its answer means.

Everything an executor answers is hostile (it runs user code): the answer is
read with a cap of 64 KiB, decoded without letting any error escape, and turned
into one :class:`Probe`: healthy or not, and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp
import msgspec

from queue_worker.router.bodies import (
    ANSWER_MAX_BYTES,
    DECODE_ERRORS,
    BodyTooLarge,
    decode_problem,
    read_capped,
)

HEALTH_REASON_CHARS = 300  # a reason quotes at most this much of what an executor sent
MAX_LEARNED_CAPACITY = 10_000  # the most EXECUTOR_CAPACITY allows


class _HealthAnswer(msgspec.Struct):
    status: str
    capacity: int | None = None


_health_decoder = msgspec.json.Decoder(_HealthAnswer)


@dataclass(frozen=True, slots=True)
class Probe:
    """One ``GET /health``: its verdict, why, how long it took and any capacity it announced."""

    healthy: bool
    reason: str
    latency_ms: float | None
    capacity: int | None = None


async def probe(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Probe:
    """``GET <url>/health``: never raises for what the executor answers.

    The answer is read with a cap of 64 KiB (``too_large`` beyond, the rest unread);
    one that cannot be decoded (not JSON, nested too deeply, bad UTF-8) is unhealthy
    with that reason. A ``capacity`` outside 1..10000 is ignored.
    """
    started = time.perf_counter()
    try:
        async with session.get(
            f"{url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                return Probe(False, f"health answered HTTP {resp.status}", _since(started))
            try:
                body = await read_capped(resp, ANSWER_MAX_BYTES)
            except BodyTooLarge as exc:
                return Probe(False, f"health answer is {exc}", _since(started))
            latency_ms = _since(started)
            try:
                answer = _health_decoder.decode(body)
            except DECODE_ERRORS as exc:
                reason = f'health answer is not {{"status": ...}} JSON ({decode_problem(exc)})'
                return Probe(False, reason[:HEALTH_REASON_CHARS], latency_ms)
            if answer.status != "healthy":
                reason = f"health status is {answer.status[:HEALTH_REASON_CHARS]!r}"
                return Probe(False, reason, latency_ms)
            capacity = answer.capacity
            if capacity is not None and not 1 <= capacity <= MAX_LEARNED_CAPACITY:
                capacity = None
            return Probe(True, "ok", latency_ms, capacity)
    except TimeoutError:
        return Probe(False, f"no health answer within {timeout_s:g}s", None)
    except aiohttp.ClientError as exc:
        return Probe(False, f"{type(exc).__name__}: {exc}"[:HEALTH_REASON_CHARS], None)


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
