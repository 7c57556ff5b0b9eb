"""``POST /execute`` on one executor, and what its answer means.

Every answer maps to exactly one outcome: :class:`Executed` when the
executor says ``completed``, else :class:`ExecutionFailed` with a stable
``reason`` code and a readable ``error``. The answer is read with a cap
(``MAX_RESPONSE_BYTES``): a longer one is not read further and fails the task as
``executor_invalid_response`` (``too_large``), like any answer that cannot be
decoded (not JSON, nested too deeply, bad UTF-8); neither is retried.

HTTP 429 and 503 mean "not now": the reason is ``executor_throttled``, with the
answer's ``Retry-After`` (seconds or an HTTP date) when it has one. The task was
not run; the caller cools the executor down and routes the task again without
spending an attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import msgspec

from queue_worker.router.bodies import (
    DECODE_ERRORS,
    MAX_RESPONSE_BYTES,
    BodyTooLarge,
    decode_problem,
    read_capped,
    read_some,
)
from queue_worker.streams.events import Task
from queue_worker.streams.tracecontext import span_id, trace_headers

ERROR_EXCERPT_CHARS = 300
THROTTLE_STATUSES = frozenset({429, 503})  # the executor says "not now": nothing was run
RETRY_AFTER_MAX_CHARS = 64  # a longer Retry-After is not a value we can read


class ExecutorAnswer(msgspec.Struct):
    status: str
    error: str | None = None
    exit_code: int | None = None


_answer_decoder = msgspec.json.Decoder(ExecutorAnswer)


@dataclass(frozen=True, slots=True)
class Executed:
    result: dict[str, Any]
    duration_ms: float


@dataclass(frozen=True, slots=True)
class ExecutionFailed:
    reason: str
    error: str
    duration_ms: float
    result: dict[str, Any] | None = None
    unreachable: bool = False
    http_status: int | None = None
    retry_after_s: float | None = None  # what a throttling answer's Retry-After asked for

    @property
    def throttled(self) -> bool:
        """The executor declined the task for now (429, 503): it was not run."""
        return self.reason == "executor_throttled"

    @property
    def retryable(self) -> bool:
        """A failure of the transport or the executor, not of the task's code."""
        if self.reason in ("executor_unreachable", "executor_no_answer"):
            return True
        return self.reason == "executor_http_error" and (
            self.http_status is None or self.http_status >= 500
        )


Outcome = Executed | ExecutionFailed


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date), ``None``
    when there is none or it cannot be read; a date in the past is 0."""
    if value is None or len(value) > RETRY_AFTER_MAX_CHARS:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # not an HTTP date (those are GMT)
        return None
    now = time.time() if now_s is None else now_s
    return max(when.timestamp() - now, 0.0)


def interpret(
    http_status: int, body: bytes, duration_ms: float, retry_after: str | None = None
) -> Outcome:
    """Classify an executor's HTTP answer (``retry_after``: its ``Retry-After`` header)."""
    text = body[:ERROR_EXCERPT_CHARS].decode("utf-8", errors="replace")
    if http_status in THROTTLE_STATUSES:
        seconds = parse_retry_after(retry_after)
        asked = "" if seconds is None else f", retry after {seconds:g}s"
        return ExecutionFailed(
            "executor_throttled",
            f"executor answered HTTP {http_status}{asked}: {text}",
            duration_ms,
            http_status=http_status,
            retry_after_s=seconds,
        )
    if not 200 <= http_status < 300:
        return ExecutionFailed(
            "executor_http_error",
            f"executor answered HTTP {http_status}: {text}",
            duration_ms,
            http_status=http_status,
        )
    try:
        result: Any = msgspec.json.decode(body)
        answer = _answer_decoder.decode(body)
    except DECODE_ERRORS as exc:
        return ExecutionFailed(
            "executor_invalid_response",
            f"executor answer is not a result ({decode_problem(exc)}): {text}",
            duration_ms,
        )
    if answer.status == "completed":
        return Executed(result, duration_ms)
    if answer.status == "failed":
        return ExecutionFailed(
            "execution_failed", answer.error or "execution failed", duration_ms, result
        )
    if answer.status == "timeout":
        return ExecutionFailed(
            "execution_timeout", answer.error or "execution timed out", duration_ms, result
        )
    return ExecutionFailed(
        "executor_invalid_response",
        f"executor answered unknown status {answer.status!r}",
        duration_ms,
        result,
    )


def too_large(exc: BodyTooLarge, duration_ms: float) -> ExecutionFailed:
    """The outcome of an answer over ``MAX_RESPONSE_BYTES``."""
    text = exc.prefix[:ERROR_EXCERPT_CHARS].decode("utf-8", errors="replace")
    return ExecutionFailed(
        "executor_invalid_response",
        f"executor answer is {exc} (MAX_RESPONSE_BYTES={exc.cap_bytes}); not read further: {text}",
        duration_ms,
    )


async def execute(
    session: aiohttp.ClientSession,
    executor_url: str,
    task: Task,
    timeout_s: float,
    margin_s: float,
    *,
    attempt: int = 1,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
    dispatch_id: str | None = None,
) -> Outcome:
    """Run ``task`` on ``executor_url`` with an HTTP timeout of ``timeout_s + margin_s``,
    reading at most ``max_response_bytes`` of the answer. The request carries
    ``Idempotency-Key: <eval_id>:<attempt>``, so an executor that honours it can drop a
    repeat of the same attempt, and ``traceparent`` (``tracestate``) naming the attempt's
    span, derived from its ``task.dispatched`` entry ``dispatch_id``."""
    payload = msgspec.json.encode(
        {"eval_id": task.eval_id, "code": task.code, "timeout": timeout_s}
    )
    traced = {}
    if dispatch_id is not None:
        span = span_id(task.eval_id, dispatch_id)
        traced = trace_headers(task.trace_id, span, task.traceparent, task.tracestate)
    started = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        async with session.post(
            f"{executor_url}/execute",
            data=payload,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": f"{task.eval_id}:{attempt}",
                **traced,
            },
            timeout=aiohttp.ClientTimeout(total=timeout_s + margin_s),
        ) as resp:
            if not 200 <= resp.status < 300:  # only an excerpt of an error is needed
                retry_after = resp.headers.get("Retry-After")
                return interpret(resp.status, await read_some(resp), elapsed(), retry_after)
            try:
                body = await read_capped(resp, max_response_bytes)
            except BodyTooLarge as exc:
                return too_large(exc, elapsed())
            return interpret(resp.status, body, elapsed())
    except TimeoutError:
        return ExecutionFailed(
            "executor_no_answer",
            f"executor gave no answer within {timeout_s + margin_s:g}s",
            elapsed(),
        )
    except aiohttp.ClientConnectionError as exc:
        return ExecutionFailed(
            "executor_unreachable", f"{type(exc).__name__}: {exc}", elapsed(), unreachable=True
        )
    except aiohttp.ClientError as exc:
        return ExecutionFailed("executor_http_error", f"{type(exc).__name__}: {exc}", elapsed())
