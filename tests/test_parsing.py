"""Decoding what the queue and the executors answer: every input gets a clear verdict."""

from __future__ import annotations

import pytest

from queue_worker.router.dispatch import Executed, ExecutionFailed, interpret
from queue_worker.router.queue_client import InvalidTask, parse_task


def test_null_is_an_empty_queue() -> None:
    assert parse_task(b"null") is None


def test_a_task_of_the_original_contract() -> None:
    task = parse_task(
        b'{"eval_id":"abc","code":"print(1)","language":"python","engine":"docker","timeout":45}'
    )
    assert task is not None
    assert (task.eval_id, task.code, task.timeout, task.language) == (
        "abc",
        "print(1)",
        45,
        "python",
    )


def test_unknown_fields_are_ignored_and_defaults_apply() -> None:
    task = parse_task(b'{"eval_id":"a","code":"","priority":3,"extra":{"x":1}}')
    assert task is not None and task.timeout is None and task.priority == 3


@pytest.mark.parametrize(
    ("body", "reason_part", "eval_id"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON", None),
        (b"", "not JSON", None),
        (b'{"code":"x"}', "eval_id", None),
        (b'{"eval_id":"e1","code":5}', "code", "e1"),
        (b'{"eval_id":"","code":"x"}', "eval_id is empty", None),
        (b'{"eval_id":"   ","code":"x"}', "eval_id is empty", None),
        (b'{"eval_id":"' + b"x" * 300 + b'","code":"x"}', "longer than 256", None),
        (b'{"eval_id":"e2","code":"x","timeout":-1}', "timeout", "e2"),
        (b'{"eval_id":"e3","code":"x","timeout":"soon"}', "timeout", "e3"),
        (b"[1,2,3]", "Expected", None),
        (b'"just a string"', "Expected", None),
        (b'{"eval_id":7,"code":"x"}', "eval_id", None),
    ],
)
def test_invalid_payloads_are_rejected_with_reason(
    body: bytes, reason_part: str, eval_id: str | None
) -> None:
    with pytest.raises(InvalidTask) as info:
        parse_task(body)
    assert reason_part in info.value.reason
    assert info.value.eval_id == eval_id
    assert info.value.excerpt == body[:200].decode(errors="replace")


def test_completed_answer() -> None:
    body = b'{"eval_id":"a","status":"completed","output":"hi","error":null,"exit_code":0}'
    outcome = interpret(200, body, 12.0)
    assert isinstance(outcome, Executed)
    assert outcome.result["output"] == "hi" and outcome.duration_ms == 12.0


@pytest.mark.parametrize(
    ("status", "body", "reason", "error_part", "has_result"),
    [
        (
            200,
            b'{"status":"failed","error":"boom","exit_code":1}',
            "execution_failed",
            "boom",
            True,
        ),
        (200, b'{"status":"failed","exit_code":1}', "execution_failed", "execution failed", True),
        (200, b'{"status":"timeout","error":"too slow"}', "execution_timeout", "too slow", True),
        (200, b'{"status":"exploded"}', "executor_invalid_response", "exploded", True),
        (200, b"not json{{", "executor_invalid_response", "not json{{", False),
        (200, b'{"output":"no status"}', "executor_invalid_response", "status", False),
        (200, b"[]", "executor_invalid_response", "Expected", False),
        (500, b"Internal Server Error", "executor_http_error", "HTTP 500", False),
        (503, b'{"detail":"executor busy"}', "executor_http_error", "busy", False),
    ],
)
def test_failed_answers(
    status: int, body: bytes, reason: str, error_part: str, has_result: bool
) -> None:
    outcome = interpret(status, body, 1.0)
    assert isinstance(outcome, ExecutionFailed)
    assert outcome.reason == reason
    assert error_part in outcome.error
    assert (outcome.result is not None) == has_result
    assert not outcome.unreachable
