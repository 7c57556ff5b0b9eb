"""Decoding what the queue and the executors answer: every input gets a clear verdict."""

from __future__ import annotations

import msgspec
import pytest

from queue_worker.router.bodies import CutBody, eval_id_in, task_body_max_bytes
from queue_worker.router.dispatch import (
    Executed,
    ExecutionFailed,
    interpret,
    parse_retry_after,
)
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
        (b'{"eval_id":"e4","code":"x","deadline":0}', "deadline", "e4"),
        (b'{"eval_id":"e5","code":"x","deadline":"tomorrow"}', "deadline", "e5"),
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
        (503, b'{"detail":"executor busy"}', "executor_throttled", "busy", False),
        (429, b"slow down", "executor_throttled", "HTTP 429", False),
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


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # 10 s after "now" below
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        ("1.5", None),  # not delay-seconds, not a date
        ("-3", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:10", None),  # no zone: not an HTTP date
        ("٣", None),  # a digit, but not ASCII
        ("9" * 100, None),  # longer than any real value
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(header, now) == seconds


def test_throttle_answers_are_not_attempt_failures() -> None:
    outcome = interpret(429, b"busy", 1.0, "3")
    assert isinstance(outcome, ExecutionFailed)
    assert outcome.throttled and outcome.retry_after_s == 3.0 and outcome.http_status == 429
    assert not outcome.retryable  # retried as a throttle, never as a failed attempt
    assert "retry after 3s" in outcome.error
    other = interpret(500, b"boom", 1.0, "3")
    assert isinstance(other, ExecutionFailed)
    assert not other.throttled and other.retryable and other.retry_after_s is None


NESTED = b"[" * 200_000  # deeper than msgspec's recursion limit: RecursionError, not DecodeError


@pytest.mark.parametrize(
    ("body", "reason", "eval_id"),
    [
        (NESTED, "Expected `object | null`, got `array`", None),
        (b'{"a":' + NESTED, "JSON nested too deeply", None),
        (b'{"eval_id":"deep-1","code":"x","extra":' + NESTED, "JSON nested too deeply", "deep-1"),
        (
            b'{"eval_id":"deep-2","code":"x","extra":' + NESTED + b"]" * 200_000 + b"}",
            "JSON nested too deeply",
            "deep-2",
        ),
    ],
)
def test_nested_json_is_rejected_with_a_reason(
    body: bytes, reason: str, eval_id: str | None
) -> None:
    with pytest.raises(InvalidTask) as info:
        parse_task(body)
    assert info.value.reason == reason
    assert info.value.eval_id == eval_id  # still failed at the queue when it names one


def test_a_cut_task_body_is_too_large_and_keeps_the_eval_id() -> None:
    prefix = b'{"eval_id": "big-1", "code": "' + b"x" * 1000
    with pytest.raises(InvalidTask) as info:
        parse_task(CutBody(prefix, "too_large: more than 1030 bytes"))
    assert info.value.reason == "task body is too_large: more than 1030 bytes"
    assert info.value.eval_id == "big-1"
    assert info.value.excerpt == prefix[:200].decode()


@pytest.mark.parametrize(
    ("prefix", "eval_id"),
    [
        (b'{"code": "x", "eval_id" :\n "late"', "late"),
        (b'{"eval_id": "esc\\"aped", "code": "', None),  # an escaped id is not guessed at
        (b'{"code": "\\"eval_id\\": \\"inner\\"', None),  # inside a string: not a key
        (b'{"eval_id": "' + b"y" * 300 + b'"', None),  # longer than 256 characters
        (b'{"eval_id": "   "', None),
        (b'{"eval_id": "\xff\xfe"', None),  # not UTF-8
        (b'{"eval_id": "caf\xc3\xa9"', "café"),
    ],
)
def test_eval_id_in_a_prefix(prefix: bytes, eval_id: str | None) -> None:
    assert eval_id_in(prefix) == eval_id


@pytest.mark.parametrize(
    "body",
    [NESTED, b'{"status":"completed","output":"x","extra":' + NESTED, b'{"status":"\xff"}'],
)
def test_undecodable_executor_answers_fail_the_task(body: bytes) -> None:
    outcome = interpret(200, body, 1.0)
    assert isinstance(outcome, ExecutionFailed)
    assert outcome.reason == "executor_invalid_response" and not outcome.retryable
    assert outcome.error.startswith("executor answer is not a result (")


def test_task_body_cap_leaves_room_for_escaping() -> None:
    # The worst case of JSON escaping: every byte of code a control character (\u00XX).
    code = "\x01" * 1000
    body = msgspec.json.encode({"eval_id": "e" * 256, "code": code, "language": "python"})
    assert len(body) <= task_body_max_bytes(len(code.encode()))
    assert task_body_max_bytes(1 << 20) == 6 * (1 << 20) + (64 << 10)
