"""Task views: ``GET /tasks/{eval_id}`` (one evaluation's history) and ``GET /tasks`` (lists
by state), served from the task index (:mod:`queue_worker.streams.index`), never a scan.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from queue_worker.http import auth
from queue_worker.http.handlers import REDIS_TIMEOUT_S, error_response, json_response
from queue_worker.http.state import STORE, TASK_INDEX
from queue_worker.openapi import examples as ex
from queue_worker.openapi import schemas as s
from queue_worker.openapi.operations import Parameter, RouteTable, json_body
from queue_worker.streams.events import Entry
from queue_worker.streams.index import STATES
from queue_worker.streams.redaction import redact_event

ROUTES = RouteTable(tag="tasks")
MAX_LIMIT = 500
EVAL_ID_MAX = 256
MAX_SINCE = 1 << 62


@ROUTES.get(
    "/tasks/{eval_id}",
    operation_id="getTask",
    summary="One evaluation's history",
    description="Every entry of the stream about `eval_id`, oldest first (each with its id, "
    "time, writer and event: the pull, every executor choice and why, the dispatches, "
    "retries, the outcome and the report), and the task's current state. Read from the task "
    "index: it costs this task's entries, not a scan. Entries trimmed by retention are gone; "
    "a task whose entries are all gone is unknown (404). Task code, executor output and error "
    'texts are shown as `{"redacted": true, "bytes": N, "sha256": "..."}` unless an admin '
    "token asks for `payloads=1`.",
    access="read",
    parameters=(
        Parameter(
            "eval_id",
            "path",
            "The evaluation.",
            {"type": "string", "minLength": 1, "maxLength": EVAL_ID_MAX},
            True,
        ),
        Parameter(
            "payloads",
            "query",
            "`1`: task payloads whole (an admin token only; 403 for any other).",
            {"type": "string", "enum": ["0", "1"]},
        ),
    ),
    responses={
        200: json_body("The task's history.", ex.TASK_HISTORY),
        400: json_body("The eval_id or payloads is not acceptable.", ex.BAD_EVAL_ID),
        403: json_body("`payloads=1` without an admin token.", ex.FORBIDDEN),
        404: json_body("No entry about this eval_id (never seen, or trimmed).", ex.TASK_UNKNOWN),
        503: json_body("Redis is unreachable.", ex.REDIS_DOWN),
    },
)
async def task(request: web.Request) -> web.Response:
    if unknown := _unknown(request, {"payloads"}):
        return unknown
    eval_id = request.match_info["eval_id"]
    if not eval_id or len(eval_id) > EVAL_ID_MAX:
        return error_response(400, "Bad Request", f"eval_id must be 1 to {EVAL_ID_MAX} characters")
    payloads = auth.wants_payloads(request)
    index, store = request.app[TASK_INDEX], request.app[STORE]
    async with asyncio.timeout(REDIS_TIMEOUT_S):
        state = await index.state(eval_id)
        history = await index.history(store, eval_id)
    if not history:
        return error_response(404, "Not Found", f"no entry about {eval_id!r} in the stream")
    return json_response(
        s.TaskHistory(
            eval_id=eval_id,
            state=None if state is None else state.state,
            executor=None if state is None else state.executor,
            entries=[
                s.TaskEntry(id=e.id, ts=e.ts, worker_id=e.worker_id, event=_shown(e, payloads))
                for e in history
            ],
        )
    )


def _unknown(request: web.Request, known: set[str]) -> web.Response | None:
    """A 400 naming the query parameters the route does not take (``None``: none)."""
    extra = sorted(set(request.query) - known)
    if not extra:
        return None
    named = ", ".join(repr(name[:40]) for name in extra[:5])
    return error_response(400, "Bad Request", f"unknown query parameter(s): {named}")


def _shown(entry: Entry, payloads: bool) -> dict[str, Any]:
    event: dict[str, Any] = msgspec.to_builtins(entry.event)
    return event if payloads else redact_event(event)


def _cursor(raw: str) -> tuple[int, str] | None:
    ms, sep, eval_id = raw.partition(":")
    if not sep or not (ms.isascii() and ms.isdigit()) or len(ms) > 19 or not eval_id:
        return None
    return int(ms), eval_id


def _whole(raw: str | None, default: int, most: int) -> int | None:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 0 <= int(raw) <= most:
        return None
    return int(raw)


@ROUTES.get(
    "/tasks",
    operation_id="listTasks",
    summary="Tasks by state",
    description="The tasks in one state (`waiting` for a slot or a retry, `in_flight` on an "
    "executor, `completed`, `failed`), the latest to enter it first, from the task index. "
    "`next_cursor`, when present, continues the list.",
    access="read",
    parameters=(
        Parameter("state", "query", "The state.", {"type": "string", "enum": list(STATES)}, True),
        Parameter(
            "executor", "query", "Only tasks last on this executor (its URL).", {"type": "string"}
        ),
        Parameter(
            "since",
            "query",
            "Only tasks that entered the state at this unix time (ms) or later.",
            {"type": "integer", "minimum": 0, "maximum": MAX_SINCE},
        ),
        Parameter(
            "limit",
            "query",
            f"At most this many (1 to {MAX_LIMIT}; 50).",
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        ),
        Parameter(
            "cursor",
            "query",
            "A previous answer's `next_cursor`.",
            {"type": "string", "pattern": "^[0-9]{1,19}:.+$"},
        ),
    ),
    responses={
        200: json_body("The tasks.", ex.TASK_LIST),
        400: json_body("A parameter is not acceptable.", ex.BAD_TASK_QUERY),
        503: json_body("Redis is unreachable.", ex.REDIS_DOWN),
    },
)
async def tasks(request: web.Request) -> web.Response:
    if unknown := _unknown(request, {"state", "executor", "since", "limit", "cursor"}):
        return unknown
    query = request.query
    state = query.get("state", "")
    if state not in STATES:
        return error_response(400, "Bad Request", f"state must be one of {', '.join(STATES)}")
    limit = _whole(query.get("limit"), 50, MAX_LIMIT)
    since = _whole(query.get("since"), 0, MAX_SINCE)
    cursor = _cursor(query["cursor"]) if "cursor" in query else None
    if limit is None or limit < 1:
        return error_response(
            400, "Bad Request", f"limit must be a whole number from 1 to {MAX_LIMIT}"
        )
    if since is None:
        return error_response(400, "Bad Request", "since must be a unix time in ms")
    if "cursor" in query and cursor is None:
        return error_response(400, "Bad Request", "cursor must be a next_cursor this API returned")
    executor = query.get("executor") or None
    index = request.app[TASK_INDEX]
    async with asyncio.timeout(REDIS_TIMEOUT_S):
        rows, following = await index.page(
            state, since_ms=since, limit=limit, cursor=cursor, executor=executor
        )
    return json_response(
        s.TaskList(
            state=state,
            tasks=[
                s.TaskStateRow(
                    eval_id=r.eval_id, state=r.state, executor=r.executor, since_ms=r.since_ms
                )
                for r in rows
            ],
            next_cursor=None if following is None else f"{following[0]}:{following[1]}",
        )
    )


def register(app: web.Application) -> None:
    """Add ``/tasks/{eval_id}`` and ``/tasks`` to ``app``."""
    ROUTES.register(app)
