"""Operator actions over HTTP (an admin token): pause and resume pulling, drain and undrain
an executor.

Each action is appended to the stream as an event naming who acted (the token's name) and
why (the caller's ``reason``); every replica folds the stream and obeys it within a second
(:mod:`queue_worker.router.control`), and a restart folds it again, so a pause or a drain
outlives the process that received it.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from queue_worker.http import auth
from queue_worker.http.handlers import json_response
from queue_worker.http.state import STORE
from queue_worker.openapi import examples as ex
from queue_worker.openapi import schemas as s
from queue_worker.openapi.operations import RouteTable, json_body
from queue_worker.streams import events as ev

ROUTES = RouteTable(tag="admin")
MAX_BODY_BYTES = 16 << 10
T = TypeVar("T", bound=msgspec.Struct)


async def _body(request: web.Request, kind: type[T]) -> T:
    """The request's JSON body as ``kind``, or a 400 that says what is wrong with it."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPBadRequest(text=f"the body is over {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise web.HTTPBadRequest(text=f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise web.HTTPBadRequest(
            text=f"the body is not what {kind.__name__} expects: {exc}"
        ) from exc


def _by(request: web.Request) -> str:
    return request[auth.PRINCIPAL].name


body_of, by_of = _body, _by  # for the actions on one task (queue_worker.http.task_actions)


async def _record(request: web.Request, event: ev.Event, action: str, scope: str) -> web.Response:
    [entry_id] = await request.app[STORE].append(event)
    return json_response(
        s.ActionRecorded(action=action, scope=scope, by=_by(request), entry_id=entry_id), 202
    )


_ERRORS = {
    400: json_body("The body is not valid JSON of the documented shape.", ex.BAD_ACTION),
    403: json_body("A read token: actions need an ADMIN_TOKEN.", ex.NEED_ADMIN),
    503: json_body("Redis is unreachable.", ex.REDIS_DOWN),
}


@ROUTES.route(
    "POST",
    "/admin/pause",
    operation_id="pausePulling",
    summary="Pause pulling, for the fleet or one worker",
    description="Appends `control.paused`. Every replica it concerns stops pulling within a "
    "second; tasks in flight finish. `/status` shows the pause, who set it and why; it "
    "outlives restarts until `POST /admin/resume`.",
    access="admin",
    body=s.PauseRequest,
    responses={202: json_body("Recorded.", ex.PAUSE_RECORDED), **_ERRORS},
)
async def pause(request: web.Request) -> web.Response:
    body = await _body(request, s.PauseRequest)
    scope = body.worker or ev.FLEET
    event = ev.ControlPaused(scope=scope, by=_by(request), reason=body.reason)
    return await _record(request, event, "pause", scope)


@ROUTES.route(
    "POST",
    "/admin/resume",
    operation_id="resumePulling",
    summary="Resume pulling, for the fleet or one worker",
    description="Appends `control.resumed`, which lifts the pause of the same scope (`worker` "
    "absent: the fleet's).",
    access="admin",
    body=s.PauseRequest,
    responses={202: json_body("Recorded.", ex.RESUME_RECORDED), **_ERRORS},
)
async def resume(request: web.Request) -> web.Response:
    body = await _body(request, s.PauseRequest)
    scope = body.worker or ev.FLEET
    event = ev.ControlResumed(scope=scope, by=_by(request), reason=body.reason)
    return await _record(request, event, "resume", scope)


@ROUTES.route(
    "POST",
    "/admin/drain",
    operation_id="drainExecutor",
    summary="Drain an executor: no new task goes to it",
    description="Appends `executor.drained`. No replica sends it a new task (within a second); "
    "its tasks in flight finish. It stays drained across restarts until `POST /admin/undrain`.",
    access="admin",
    body=s.DrainRequest,
    responses={202: json_body("Recorded.", ex.DRAIN_RECORDED), **_ERRORS},
)
async def drain(request: web.Request) -> web.Response:
    body = await _body(request, s.DrainRequest)
    event = ev.ExecutorDrained(executor=body.executor, by=_by(request), reason=body.reason)
    return await _record(request, event, "drain", body.executor)


@ROUTES.route(
    "POST",
    "/admin/undrain",
    operation_id="undrainExecutor",
    summary="Undrain an executor: it takes tasks again",
    description="Appends `executor.undrained`.",
    access="admin",
    body=s.DrainRequest,
    responses={202: json_body("Recorded.", ex.UNDRAIN_RECORDED), **_ERRORS},
)
async def undrain(request: web.Request) -> web.Response:
    body = await _body(request, s.DrainRequest)
    event = ev.ExecutorUndrained(executor=body.executor, by=_by(request), reason=body.reason)
    return await _record(request, event, "undrain", body.executor)


def register(app: web.Application) -> None:
    """Add the ``/admin/*`` actions to ``app``."""
    ROUTES.register(app)
