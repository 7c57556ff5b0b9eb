"""Operator actions on one evaluation (an admin token): cancel it, or retry a finished one.

``POST /tasks/{eval_id}/cancel`` appends ``task.cancel_requested`` (who, why) when a
worker of the fleet holds the task (pulled, not yet terminal); any replica may receive
it: the one holding the task folds it from the stream and cancels it
(:mod:`queue_worker.router.control`, :meth:`queue_worker.router.attempts.Attempts.cancel`).
A task nobody pulled is 404 (one still in the queue is the queue's to remove), a finished
one 409.

``POST /tasks/{eval_id}/retry`` enqueues a finished (completed or failed) task again at
the queue it came from (``POST /tasks``, with ``X-API-Key``), built from its
``task.pulled``, as the new evaluation ``<eval_id>-retry-<n>`` (a queue refuses an
``eval_id`` it knows: 409), and appends ``task.retry_requested`` linking the two.

:func:`request_cancel` and :func:`retry` are what the CLI (``queue-worker cancel`` /
``retry``) runs too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from queue_worker.config import Settings
from queue_worker.http import admin
from queue_worker.http.handlers import REDIS_TIMEOUT_S, error_response, json_response
from queue_worker.http.state import SESSION, SETTINGS, STATUS, STORE, TASK_INDEX
from queue_worker.openapi import examples as ex
from queue_worker.openapi import schemas as s
from queue_worker.openapi.operations import Parameter, RouteTable, json_body
from queue_worker.router.queue_client import QueueClient, QueueClients, ReportRefused
from queue_worker.streams import events as ev
from queue_worker.streams.entries import id_key
from queue_worker.streams.index import TaskIndex
from queue_worker.streams.store import EventStore
from queue_worker.streams.views import StatusView

ROUTES = RouteTable(tag="admin", errors=(405,))
EVAL_ID_MAX = 256
FINISHED = ("completed", "failed")
MAX_RETRIES = 1000  # retries of one evaluation (the suffix of the next one's id)

# (queue URL or None for QUEUE_SERVICE_URL, the task) -> (its URL, HTTP status, excerpt)
Enqueue = Callable[[str | None, dict[str, Any]], Awaitable[tuple[str, int, str]]]


class ActionRefused(Exception):
    """The action cannot be taken: an HTTP status, its name and why."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


async def request_cancel(
    store: EventStore,
    index: TaskIndex,
    view: StatusView | None,
    eval_id: str,
    by: str,
    reason: str,
) -> str:
    """Append ``task.cancel_requested`` for a task the fleet holds; its entry id. Raises
    :class:`ActionRefused` (404 never pulled, 409 finished)."""
    if view is None or eval_id not in view.in_flight:
        if view is not None and (outcome := view.unreported.get(eval_id)) is not None:
            raise ActionRefused(
                409,
                "Conflict",
                f"{eval_id!r} is already {outcome}: only a task in flight can be "
                "cancelled (a finished one can be retried)",
            )
        state = await index.state(eval_id)
        if state is None:
            raise ActionRefused(
                404,
                "Not Found",
                f"no worker pulled {eval_id!r} (or its entries were trimmed): only tasks a "
                "worker has pulled can be cancelled here; a task still in the queue is the "
                "queue's to remove",
            )
        # The index may trail the view: a task the view has folded past the entry of its
        # indexed state, and does not hold, has finished.
        folded_past = view is not None and id_key(view.last_id or "0-0") >= id_key(state.entry_id)
        if state.state in FINISHED or folded_past:
            raise ActionRefused(
                409,
                "Conflict",
                f"{eval_id!r} is already "
                f"{state.state if state.state in FINISHED else 'finished'}: only a task in "
                "flight can be "
                "cancelled (a finished one can be retried)",
            )
    trace_id = await _trace_of(store, view, eval_id)
    [entry_id] = await store.append(
        ev.TaskCancelRequested(eval_id=eval_id, by=by, reason=reason, trace_id=trace_id)
    )
    return entry_id


async def _trace_of(store: EventStore, view: StatusView | None, eval_id: str) -> str | None:
    """The trace of a task in flight in the fleet: its ``task.pulled``'s (``None`` when
    that entry is gone or the task is not in flight)."""
    held = view.in_flight.get(eval_id) if view is not None else None
    if held is None or not held.pulled_id:
        return None
    for entry in await store.read_ids([held.pulled_id]):
        if isinstance(entry.event, ev.TaskPulled):
            return entry.event.task.trace_id
    return None


def retry_task(task: ev.Task, new_eval_id: str) -> dict[str, Any]:
    """The body of ``POST /tasks`` that runs ``task`` again as ``new_eval_id`` (without
    its deadline, which has passed, and its lease)."""
    body: dict[str, Any] = {
        "eval_id": new_eval_id,
        "code": task.code,
        "language": task.language,
        "engine": task.engine,
    }
    for name in ("timeout", "priority", "affinity_key", "session_id"):
        if (value := getattr(task, name)) is not None:
            body[name] = value
    return body


async def retry(
    store: EventStore, index: TaskIndex, enqueue: Enqueue, eval_id: str, by: str, reason: str
) -> tuple[str, ev.TaskRetryRequested]:
    """Enqueue a finished task again and append ``task.retry_requested``: (its entry id,
    the event). Raises :class:`ActionRefused` (404 unknown, 409 not finished or already
    enqueued, 502 the queue refused or is unreachable)."""
    state = await index.state(eval_id)
    history = await index.history(store, eval_id) if state is not None else []
    if state is None or not history:
        raise ActionRefused(404, "Not Found", f"no entry about {eval_id!r} in the stream")
    if state.state not in FINISHED:
        raise ActionRefused(
            409,
            "Conflict",
            f"{eval_id!r} is {state.state}: only a completed or failed task can be retried",
        )
    pulled = [e.event for e in history if isinstance(e.event, ev.TaskPulled | ev.TaskRestored)]
    if not pulled:
        raise ActionRefused(
            409, "Conflict", f"the task.pulled of {eval_id!r} was trimmed: its task is unknown"
        )
    earlier = sum(isinstance(e.event, ev.TaskRetryRequested) for e in history)
    if earlier >= MAX_RETRIES:
        raise ActionRefused(409, "Conflict", f"{eval_id!r} was retried {earlier} times")
    new_eval_id = f"{eval_id}-retry-{earlier + 1}"
    source = pulled[-1]
    try:
        queue, status, answer = await enqueue(source.queue, retry_task(source.task, new_eval_id))
    except ReportRefused as exc:
        raise ActionRefused(502, "Bad Gateway", f"the queue cannot be reached: {exc}") from exc
    if status == 409:
        raise ActionRefused(
            409,
            "Conflict",
            f"the queue at {queue} already has {new_eval_id!r} (a retry of {eval_id!r} under "
            f"way?): {answer}",
        )
    if not 200 <= status < 300:
        raise ActionRefused(
            502, "Bad Gateway", f"the queue at {queue} answered HTTP {status}: {answer}"
        )
    event = ev.TaskRetryRequested(
        eval_id=eval_id, by=by, reason=reason, new_eval_id=new_eval_id, queue=queue,
        trace_id=source.task.trace_id,
    )  # fmt: skip
    [entry_id] = await store.append(event)
    return entry_id, event


def enqueuer(session: aiohttp.ClientSession, settings: Settings) -> Enqueue:
    """``POST /tasks`` at a queue (``None``: ``QUEUE_SERVICE_URL``) as the worker calls it."""
    clients = QueueClients(QueueClient.from_settings(session, settings))

    async def enqueue(url: str | None, task: dict[str, Any]) -> tuple[str, int, str]:
        client = clients.get(url)
        status, answer = await client.create(task)
        return client.base_url, status, answer

    return enqueue


# --- HTTP ------------------------------------------------------------------------------------

_EVAL_ID = Parameter(
    "eval_id",
    "path",
    "The evaluation.",
    {"type": "string", "minLength": 1, "maxLength": EVAL_ID_MAX},
    True,
)
_ERRORS = {
    400: json_body("The body is not valid JSON of the documented shape.", ex.BAD_TASK_ACTION),
    403: json_body("A read token: actions need an ADMIN_TOKEN.", ex.NEED_ADMIN),
    503: json_body("Redis is unreachable.", ex.REDIS_DOWN),
}


def _eval_id(request: web.Request) -> str:
    eval_id = request.match_info["eval_id"]
    if not eval_id or len(eval_id) > EVAL_ID_MAX:
        raise web.HTTPBadRequest(text=f"eval_id must be 1 to {EVAL_ID_MAX} characters")
    return eval_id


@ROUTES.route(
    "POST",
    "/tasks/{eval_id}/cancel",
    operation_id="cancelTask",
    summary="Cancel an evaluation a worker holds",
    description="Appends `task.cancel_requested` (who, why). The replica holding the task "
    "(any replica may receive the request) cancels it within a second: waiting for a slot "
    "or a retry, it is never dispatched; running, the worker stops waiting and calls the "
    "executor's `POST /execute/{eval_id}/cancel` (an executor without it, 404/405, runs it "
    "to its end: that late answer is recorded as `task.answer_discarded`, not reported). It "
    "records `task.cancelled`, then `task.failed` with reason and error `cancelled`, which "
    "is reported to the queue and published like any failure. Only pulled tasks can be "
    "cancelled here: one still in the queue (404) is the queue's to remove; a finished one "
    "is 409.",
    access="admin",
    parameters=(_EVAL_ID,),
    body=s.TaskActionRequest,
    responses={
        202: json_body("Recorded: the holder cancels it.", ex.CANCEL_RECORDED),
        404: json_body("No worker pulled this eval_id (or it was trimmed).", ex.CANCEL_UNKNOWN),
        409: json_body("The task is already completed or failed.", ex.CANCEL_FINISHED),
        **_ERRORS,
    },
)
async def cancel(request: web.Request) -> web.Response:
    eval_id = _eval_id(request)
    body = await admin.body_of(request, s.TaskActionRequest)
    app, by = request.app, admin.by_of(request)
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            entry_id = await request_cancel(
                app[STORE], app[TASK_INDEX], app[STATUS].view, eval_id, by, body.reason
            )
    except ActionRefused as exc:
        return error_response(exc.status, exc.error, exc.detail)
    answer = s.ActionRecorded(action="cancel", scope=eval_id, by=by, entry_id=entry_id)
    return json_response(answer, 202)


@ROUTES.route(
    "POST",
    "/tasks/{eval_id}/retry",
    operation_id="retryTask",
    summary="Run a finished evaluation again",
    description="Only a completed or failed task (else 409). Its task, as its `task.pulled` "
    "recorded it (without its deadline), is enqueued at the queue it came from (`POST "
    "/tasks`) as the new evaluation `<eval_id>-retry-<n>`: a queue refuses an `eval_id` it "
    "knows, so the retry's outcome is reported and published under the new id. Appends "
    "`task.retry_requested` (who, why, `new_eval_id`) to the earlier task's history.",
    access="admin",
    parameters=(_EVAL_ID,),
    body=s.TaskActionRequest,
    responses={
        202: json_body("Enqueued and recorded.", ex.RETRY_RECORDED),
        404: json_body("No entry about this eval_id (never seen, or trimmed).", ex.RETRY_UNKNOWN),
        409: json_body(
            "The task is not finished, or the queue already has its retry.", ex.RETRY_NOT_FINISHED
        ),
        502: json_body("The queue refused the task, or cannot be reached.", ex.QUEUE_REFUSED),
        **_ERRORS,
    },
)
async def retry_route(request: web.Request) -> web.Response:
    eval_id = _eval_id(request)
    body = await admin.body_of(request, s.TaskActionRequest)
    app, by = request.app, admin.by_of(request)
    enqueue = enqueuer(app[SESSION], app[SETTINGS])
    try:
        entry_id, event = await retry(
            app[STORE], app[TASK_INDEX], enqueue, eval_id, by, body.reason
        )
    except ActionRefused as exc:
        return error_response(exc.status, exc.error, exc.detail)
    answer = s.RetryRecorded(
        action="retry",
        scope=eval_id,
        by=by,
        entry_id=entry_id,
        new_eval_id=event.new_eval_id,
        queue=event.queue,
    )
    return json_response(answer, 202)


def register(app: web.Application) -> None:
    """Add ``POST /tasks/{eval_id}/cancel`` and ``/retry`` to ``app``."""
    ROUTES.register(app)
