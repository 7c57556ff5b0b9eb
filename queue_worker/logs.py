"""structlog, configured once: JSON in production, console for development.

A processor masks any field whose name suggests a secret, so an API key or
a password never reaches a log line; another replaces any field named like a
task's payload (its code, the executor's output or error body, a body read from
a service) with its size and hash, so what users submit never does either.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import msgspec
import structlog

SECRET_WORDS = ("api_key", "apikey", "password", "secret", "token", "authorization")


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event_dict:
        if any(word in key.lower() for word in SECRET_WORDS):
            event_dict[key] = "***"
    return event_dict


# Fields whose value is (or holds) a task's code, its output or error body, or a body read
# from another service: logged as {"redacted": true, "bytes": N, "sha256": ...}.
PAYLOAD_FIELDS = frozenset(
    {"code", "output", "stdout", "stderr", "result", "task", "excerpt", "body", "payload"}
)


def redact_payloads(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if key.lower() in PAYLOAD_FIELDS and value is not None:
            data = value.encode() if isinstance(value, str) else to_json(value, repr).encode()
            sha = hashlib.sha256(data).hexdigest()
            event_dict[key] = {"redacted": True, "bytes": len(data), "sha256": sha}
    return event_dict


def to_json(obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    """``json.dumps`` for structlog's ``JSONRenderer``, by msgspec (several times faster:
    the worker logs on its hot path). ``default`` renders what msgspec cannot."""
    return msgspec.json.encode(obj, enc_hook=default).decode()


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    numeric = logging.getLevelNamesMapping()[level]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=to_json)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            redact_payloads,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
