"""``POST /execute`` on one executor, and what its answer means.

Every answer maps to exactly one outcome: :class:`Executed` when the
executor says ``completed``, else :class:`ExecutionFailed` with a stable
``reason`` code and a readable ``error``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from queue_worker.streams.events import Task

ERROR_EXCERPT_CHARS = 300


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

    @property
    def retryable(self) -> bool:
        """A failure of the transport or the executor, not of the task's code."""
        if self.reason in ("executor_unreachable", "executor_no_answer"):
            return True
        return self.reason == "executor_http_error" and (
            self.http_status is None or self.http_status >= 500
        )


Outcome = Executed | ExecutionFailed


def interpret(http_status: int, body: bytes, duration_ms: float) -> Outcome:
    """Classify an executor's HTTP answer."""
    text = body[:ERROR_EXCERPT_CHARS].decode("utf-8", errors="replace")
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
    except msgspec.DecodeError as exc:
        return ExecutionFailed(
            "executor_invalid_response",
            f"executor answer is not a result ({exc}): {text}",
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


async def execute(
    session: aiohttp.ClientSession, executor_url: str, task: Task, timeout_s: float, margin_s: float
) -> Outcome:
    """Run ``task`` on ``executor_url`` with an HTTP timeout of ``timeout_s + margin_s``."""
    payload = msgspec.json.encode(
        {"eval_id": task.eval_id, "code": task.code, "timeout": timeout_s}
    )
    started = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        async with session.post(
            f"{executor_url}/execute",
            data=payload,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s + margin_s),
        ) as resp:
            body = await resp.read()
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
