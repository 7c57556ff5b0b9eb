"""Reading what the queue and the executors answer: bounded in size, safe to decode.

Everything from outside is hostile, and executors run user code, so an answer may
be of any size, endless, or JSON nested deep enough to exhaust the decoder's
recursion limit. Every answer is therefore read with a cap: ``Content-Length`` is
checked first when present, then the body is read chunk by chunk and the
connection is dropped as soon as the cap is passed (:func:`read_capped`). An
endless chunked body stops at its cap; memory per answer is at most its cap plus
one chunk.

Decoding failures of every kind (msgspec's errors, ``UnicodeError``, both
``ValueError`` subclasses, and the ``RecursionError`` msgspec raises for deeply
nested JSON, even inside fields a typed decoder does not know) are caught as
:data:`DECODE_ERRORS` and described by :func:`decode_problem`.

The caps:

* executor ``/execute`` answers: ``MAX_RESPONSE_BYTES`` (default 16 MiB);
* ``GET /tasks/next``: :func:`task_body_max_bytes` of ``MAX_CODE_BYTES``, i.e.
  6 x ``MAX_CODE_BYTES`` (the worst case of JSON escaping: a control character
  becomes ``\\u00XX``) plus 64 KiB for the other fields;
* executor ``/health`` answers and the queue's report, renew and stats answers:
  :data:`ANSWER_MAX_BYTES` (64 KiB).
"""

from __future__ import annotations

import re

import aiohttp

from queue_worker.errors import QueueWorkerError

ANSWER_MAX_BYTES = 64 << 10
MAX_RESPONSE_BYTES = 16 << 20  # the default of the MAX_RESPONSE_BYTES setting
JSON_ESCAPE_FACTOR = 6
TASK_FIELDS_BYTES = 64 << 10
# An answer whose Content-Length is over its cap is not read, except this much of it
# (an excerpt for the error, and the eval_id a task body may name).
PREFIX_BYTES = 64 << 10
MAX_EVAL_ID_CHARS = 256

# msgspec.DecodeError and UnicodeError are ValueErrors; RecursionError is not.
DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError)

_EVAL_ID = re.compile(rb'"eval_id"\s*:\s*"([^"\\\x00-\x1f]{1,1024})"')


def task_body_max_bytes(max_code_bytes: int) -> int:
    """The cap of a ``GET /tasks/next`` body for a given ``MAX_CODE_BYTES``."""
    return JSON_ESCAPE_FACTOR * max_code_bytes + TASK_FIELDS_BYTES


def decode_problem(exc: BaseException) -> str:
    """A readable reason for a decoding failure."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return str(exc) or type(exc).__name__


class BodyTooLarge(QueueWorkerError):
    """An answer passed its cap; ``prefix`` holds what was read of it."""

    def __init__(self, cap_bytes: int, prefix: bytes, declared_bytes: int | None) -> None:
        if declared_bytes is not None:
            size = f"Content-Length {declared_bytes} is over {cap_bytes} bytes"
        else:
            size = f"more than {cap_bytes} bytes"
        super().__init__(f"too_large: {size}")
        self.cap_bytes = cap_bytes
        self.prefix = prefix
        self.declared_bytes = declared_bytes


class CutBody(bytes):
    """The first bytes of an answer that passed its cap; ``problem`` says which cap."""

    problem: str

    def __new__(cls, prefix: bytes, problem: str) -> CutBody:
        body = super().__new__(cls, prefix)
        body.problem = problem
        return body


async def _read_prefix(resp: aiohttp.ClientResponse, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = await resp.content.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


async def read_capped(
    resp: aiohttp.ClientResponse, cap_bytes: int, *, prefix_bytes: int = PREFIX_BYTES
) -> bytes:
    """The whole body of ``resp``, or :class:`BodyTooLarge` as soon as it passes ``cap_bytes``.

    A declared ``Content-Length`` over the cap fails at once (after reading up to
    ``prefix_bytes`` of it); otherwise chunks are read as they come. On failure the
    connection is closed, so the rest of the body is never received.
    """
    declared = resp.content_length
    if declared is not None and declared > cap_bytes:
        prefix = await _read_prefix(resp, min(prefix_bytes, cap_bytes))
        resp.close()
        raise BodyTooLarge(cap_bytes, prefix, declared)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap_bytes:
            chunks.append(chunk[: len(chunk) - (size - cap_bytes)])
            resp.close()
            raise BodyTooLarge(cap_bytes, b"".join(chunks), None)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_some(resp: aiohttp.ClientResponse, cap_bytes: int = ANSWER_MAX_BYTES) -> bytes:
    """The body of ``resp``, or only its first ``cap_bytes`` when it is longer
    (for answers read only for an excerpt or a small verdict)."""
    try:
        return await read_capped(resp, cap_bytes)
    except BodyTooLarge as exc:
        return exc.prefix


def eval_id_in(prefix: bytes) -> str | None:
    """The ``eval_id`` a body that cannot be decoded still names, if it looks usable.

    A plain search of ``"eval_id": "<id>"`` (no escapes in the id), for a body cut at
    its cap or otherwise undecodable, so the task it stands for can be failed at the
    queue rather than left running there.
    """
    found = _EVAL_ID.search(prefix)
    if found is None:
        return None
    try:
        value = found.group(1).decode()
    except UnicodeDecodeError:
        return None
    if value.strip() and len(value) <= MAX_EVAL_ID_CHARS:
        return value
    return None
