"""Log lines: one JSON object each (rendered by msgspec), secrets masked, never a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from queue_worker.logs import configure_logging


class Opaque:
    def __repr__(self) -> str:
        return "<opaque thing>"


@pytest.fixture
def json_logs() -> Iterator[None]:
    try:
        yield
    finally:
        configure_logging("WARNING", "console")  # as the session's conftest sets it


def test_json_lines_carry_the_fields_mask_secrets_and_render_anything(json_logs, capsys) -> None:
    configure_logging("INFO", "json")  # now: it binds the stderr capsys put in place
    log = structlog.get_logger("test_logs")
    log.info("task_completed", eval_id="é-1", ms=12.5, executor="http://x:1")
    log.warning("odd", thing=Opaque(), queue_api_key="KEY-123", nested={"n": [1, None]})
    log.debug("not shown")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "task_completed" and first["level"] == "info"
    assert (first["eval_id"], first["ms"], first["executor"]) == ("é-1", 12.5, "http://x:1")
    assert first["timestamp"].endswith("Z")
    assert second["thing"] == "<opaque thing>"
    assert second["queue_api_key"] == "***" and "KEY-123" not in lines[1]
    assert second["nested"] == {"n": [1, None]}
