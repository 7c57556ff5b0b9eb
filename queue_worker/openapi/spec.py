"""The OpenAPI 3.1 document: the HTTP API, the event stream and the pub/sub messages.

Built with apispec from the JSON Schemas msgspec derives from our Structs, so
the document cannot drift from the code. Pure: no I/O, no running app needed.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import yaml
from apispec import APISpec

from queue_worker import __version__
from queue_worker.openapi import schemas as s
from queue_worker.streams import events as ev
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL, Keys
from queue_worker.streams.publisher import CompletedMessage, FailedMessage
from queue_worker.streams.views import Counters

OPENAPI_VERSION = "3.1.0"
TITLE = "queue-worker"
REF_TEMPLATE = "#/components/schemas/{name}"
_ORDER = ("openapi", "info", "servers", "tags", "paths", "webhooks", "components")

STREAM = Keys().events
STREAM_DESCRIPTION = f"""\
Every state change of the worker is appended to one Redis Stream per deployment, key \
`{{<prefix>}}:events` (`STREAM_PREFIX`, default `{STREAM}`; the braces are a Redis Cluster \
hash tag). Each entry has flat fields:

- `type`: the event type, e.g. `task.completed`
- `eval_id`: the evaluation, empty when the event has none
- `worker_id`: the worker that appended it
- `ts`: milliseconds since the epoch
- `data`: the event as JSON, one of the `StreamEvent` schemas, discriminated by `type` \
(repeated inside); `v` is the schema version of that event type

Read it with `XRANGE {STREAM} - +` (audit), or with a consumer group of your own: \
`XGROUP CREATE {STREAM} <group> $ MKSTREAM`, then \
`XREADGROUP GROUP <group> <consumer> COUNT 100 BLOCK 1000 STREAMS {STREAM} >` \
and `XACK` each entry once handled."""

_RESULT = {
    "eval_id": "eval-42",
    "status": "completed",
    "output": "4\n",
    "error": None,
    "exit_code": 0,
    "executor_id": "executor-1",
}
_EXECUTORS = ("http://executor-1:8083", "http://executor-2:8083")


def _event_table() -> str:
    rows = ["| type | schema | fields | meaning |", "|---|---|---|---|"]
    for cls in ev.EVENT_TYPES:
        fields = ", ".join(f for f in cls.__struct_fields__ if f != "v")
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        rows.append(f"| `{cls.__struct_config__.tag}` | `{cls.__name__}` | {fields} | {doc} |")
    return "\n".join(rows)


def _description() -> str:
    return f"""\
Event-sourced task router: pulls evaluation tasks from the Queue Service, routes each one to a \
healthy executor, reports the outcome and tells the platform over Redis. This HTTP API is for \
monitoring and documentation; every error it returns is a JSON `ErrorResponse`, never HTML.

## Event stream

{STREAM_DESCRIPTION}

{_event_table()}

## Pub/sub messages

Terminal events are published by the publisher projector as Redis `PUBLISH` on the channels \
`{COMPLETED_CHANNEL}` (`CompletedMessage`) and `{FAILED_CHANNEL}` (`FailedMessage`), \
documented below as webhooks. `PUBLISH` and the `XACK` of the stream entries run in one \
atomic script, so a message is neither sent twice nor skipped by a crash of the worker; pub/sub \
itself delivers only to subscribers connected at that moment (use a consumer group on the \
stream for durable delivery)."""


def _examples() -> dict[str, Any]:
    ok = [s.ExecutorHealth(url=u, healthy=True, reason="ok") for u in _EXECUTORS]
    down = [
        s.ExecutorHealth(url=u, healthy=False, reason="no health answer within 2s")
        for u in _EXECUTORS
    ]
    healthy = s.HealthResponse(
        status="healthy",
        worker_id="queue-worker-1",
        redis=True,
        queue_reachable=True,
        executors_healthy=2,
        executors_total=2,
        loops_dead=[],
        executors=ok,
    )
    status = s.StatusResponse(
        worker_id="queue-worker-1",
        version=__version__,
        strategy="round_robin",
        uptime_s=3600.5,
        in_flight=2,
        waiting=1,
        routed_last_minute=12,
        counters=Counters(pulled=120, routed=121, completed=110, failed=9, reported=119),
        live=s.LiveCounters(
            polls=900,
            empty_polls=780,
            published=119,
            report_errors=0,
            events_appended=860,
            append_round_trips=410,
        ),
        queue=s.QueueStatus(url="http://queue:8081", reachable=True, consecutive_errors=0),
        executors=[
            s.ExecutorStatus(
                url=u,
                healthy=True,
                health_reason="ok",
                last_check_ms=1_735_689_600_000,
                latency_ms=1.8,
                capacity=1,
                in_flight=i,
                routed=60 + i,
                completed=55,
                failed=4 + i,
            )
            for i, u in enumerate(_EXECUTORS)
        ],
        stream=s.StreamStatus(
            key=STREAM,
            length=860,
            last_id="1735689600000-0",
            projectors=[
                s.ProjectorStatus(name="status", last_id="1735689600000-0"),
                s.ProjectorStatus(name="publisher", last_id="1735689600000-0", pending=0, lag=0),
                s.ProjectorStatus(name="reporter", last_id="1735689599000-3", pending=1, lag=2),
            ],
        ),
        fleet=[
            s.FleetMember(
                worker_id="queue-worker-1",
                alive=True,
                running=True,
                in_flight=1,
                counters=Counters(pulled=120, routed=121, completed=110, failed=9, reported=119),
            )
        ],
    )
    values: dict[str, Any] = {
        "healthy": healthy,
        "degraded": msgspec.structs.replace(
            healthy, status="degraded", executors_healthy=0, executors=down
        ),
        "status": status,
        "not_found": s.ErrorResponse(error="Not Found", status=404, detail="404: Not Found"),
        "bad_request": s.ErrorResponse(
            error="Bad Request", status=400, detail="last must be a whole number from 0 to 1000"
        ),
        "not_allowed": s.ErrorResponse(
            error="Method Not Allowed", status=405, detail="405: Method Not Allowed"
        ),
        "redis_down": s.ErrorResponse(
            error="Service Unavailable", status=503, detail="Redis is unreachable"
        ),
        "completed": CompletedMessage("eval-42", _RESULT),
        "failed": FailedMessage(
            "eval-43",
            "executor timed out after 30s",
            {**_RESULT, "eval_id": "eval-43", "status": "timeout", "output": "", "exit_code": -1},
        ),
    }
    return {name: msgspec.to_builtins(value) for name, value in values.items()}


def _register_schemas(spec: APISpec) -> None:
    types = [ev.AnyEvent, *ev.EVENT_TYPES, s.HealthResponse, s.StatusResponse, s.ErrorResponse]
    (union, *_), components = msgspec.json.schema_components(
        [*types, CompletedMessage, FailedMessage], ref_template=REF_TEMPLATE
    )
    for name, schema in components.items():
        spec.components.schema(name, schema)
    spec.components.schema(
        "StreamEvent",
        {
            "title": "StreamEvent",
            "description": STREAM_DESCRIPTION,
            "oneOf": union["anyOf"],
            "discriminator": union["discriminator"],
        },
    )


def _json(schema: str, example: Any) -> dict[str, Any]:
    return {"application/json": {"schema": schema, "example": example}}


def _doc_operation(summary: str, media: str, example: Any, schema_type: str) -> dict[str, Any]:
    content = {media: {"schema": {"type": schema_type}, "example": example}}
    return {
        "get": {
            "tags": ["documentation"],
            "summary": summary,
            "responses": {
                "200": {"description": summary, "content": content},
                "405": "MethodNotAllowed",
            },
        }
    }


def _register_paths(spec: APISpec, examples: dict[str, Any]) -> None:
    errors = {"404": "NotFound", "405": "MethodNotAllowed"}
    spec.components.response(
        "NotFound",
        {"description": "No such route.", "content": _json("ErrorResponse", examples["not_found"])},
    )
    spec.components.response(
        "MethodNotAllowed",
        {
            "description": "The path exists, but not for this method (e.g. `POST`, `HEAD`).",
            "headers": {
                "Allow": {
                    "description": "The methods this path supports (RFC 9110), e.g. `GET`.",
                    "required": True,
                    "schema": {"type": "string"},
                    "example": "GET",
                }
            },
            "content": _json("ErrorResponse", examples["not_allowed"]),
        },
    )
    spec.path(
        path="/health",
        operations={
            "get": {
                "tags": ["monitoring"],
                "summary": "Service health with executor status",
                "operationId": "getHealth",
                "description": "`status` is `healthy` when Redis is reachable, every executor "
                "is healthy and every background loop runs, else `degraded`. The HTTP status is "
                "503 only when the worker cannot make progress; use it as a liveness or "
                "readiness probe.",
                "responses": {
                    "200": {
                        "description": "The worker can make progress: Redis reachable, at least "
                        "one healthy executor, every background loop running (`status` may "
                        "still be `degraded` when some executors are unhealthy).",
                        "content": _json("HealthResponse", examples["healthy"]),
                    },
                    "503": {
                        "description": "The worker cannot make progress: Redis is unreachable, "
                        "no executor is healthy, or a background loop (router, status, "
                        "publisher, reporter) died (`loops_dead`).",
                        "content": _json("HealthResponse", examples["degraded"]),
                    },
                    **errors,
                },
            }
        },
    )
    spec.path(
        path="/status",
        operations={
            "get": {
                "tags": ["monitoring"],
                "summary": "Detailed worker and executor status",
                "operationId": "getStatus",
                "description": "Counters folded from the event stream (`counters`, per-executor "
                "`routed`/`completed`/`failed`), live process counters (`live`), executor "
                "health and load, and the stream with its projectors' progress.",
                "responses": {
                    "200": {
                        "description": "The status view.",
                        "content": _json("StatusResponse", examples["status"]),
                    },
                    "503": {
                        "description": "Redis is unreachable.",
                        "content": _json("ErrorResponse", examples["redis_down"]),
                    },
                    **errors,
                },
            }
        },
    )
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "tags": ["monitoring"],
                "summary": "Prometheus metrics",
                "operationId": "getMetrics",
                "description": "Counters and histograms folded from the event stream (tasks by "
                "outcome and executor, routing failures, events by type, task duration, routing "
                "overhead) and live gauges (executor health and in-flight, queue polls, "
                "publishes, stream length, projector lag), in the Prometheus text format.",
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {
                            "text/plain": {
                                "schema": {"type": "string"},
                                "example": "queue_worker_stream_length 42.0\n",
                            }
                        },
                    },
                    **errors,
                },
            }
        },
    )
    spec.path(
        path="/",
        operations={
            "get": {
                "tags": ["monitoring"],
                "summary": "Redirect to the dashboard",
                "operationId": "getRoot",
                "responses": {
                    "302": {
                        "description": "To `/dashboard`.",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    **errors,
                },
            }
        },
    )
    spec.path(
        path="/dashboard",
        operations={
            "get": {
                "tags": ["monitoring"],
                "summary": "Live dashboard",
                "operationId": "getDashboard",
                "description": "Executors (health, in flight, latency, routed), counters, "
                "throughput over the last minutes and a live tail of the event stream. "
                "Served by the worker itself; no CDN.",
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **errors,
                },
            }
        },
    )
    spec.path(
        path="/events/stream",
        operations={
            "get": {
                "tags": ["monitoring"],
                "summary": "The event stream, live, as Server-Sent Events",
                "operationId": "getEventStream",
                "description": "The last `last` entries, then every new one as it is "
                "appended. Each message's `id` is the stream id (send it back as "
                "`Last-Event-ID` to resume) and its `data` is "
                '`{"id", "ts", "worker_id", "event": <StreamEvent>}`.',
                "parameters": [
                    {
                        "name": "last",
                        "in": "query",
                        "required": False,
                        "description": "Entries to send first (0 to 1000).",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "An endless `text/event-stream`.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": {
                        "description": "`last` is not a whole number from 0 to 1000.",
                        "content": _json("ErrorResponse", examples["bad_request"]),
                    },
                    "503": {
                        "description": "Too many live streams at once, or Redis unreachable.",
                        "content": _json("ErrorResponse", examples["redis_down"]),
                    },
                    **errors,
                },
            }
        },
    )
    doc = {"openapi": OPENAPI_VERSION, "info": {"title": TITLE, "version": __version__}}
    html = '<!doctype html><html lang="en"><head><meta charset="utf-8">...</html>'
    spec.path(
        path="/openapi.json",
        operations=_doc_operation("This document as JSON", "application/json", doc, "object"),
    )
    # YAML is a serialization of the same object (clients such as schemathesis parse it as
    # one), so its schema and example are the object's, like JSON's.
    spec.path(
        path="/openapi.yaml",
        operations=_doc_operation("This document as YAML", "application/yaml", doc, "object"),
    )
    spec.path(path="/docs", operations=_doc_operation("Swagger UI", "text/html", html, "string"))
    spec.path(path="/redoc", operations=_doc_operation("ReDoc", "text/html", html, "string"))


def _webhook(channel: str, schema: str, example: Any, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "tags": ["events"],
            "summary": summary,
            "operationId": "publish_" + channel.replace(":", "_"),
            "description": f"Not an HTTP call: a Redis `PUBLISH {channel} <JSON body>` by the "
            "publisher projector, once per terminal event of the stream. Subscribe with "
            f"`SUBSCRIBE {channel}`.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": REF_TEMPLATE.format(name=schema)},
                        "example": example,
                    }
                },
            },
        }
    }


def build_spec(*, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document as a dict; ``server_url`` becomes its only server."""
    examples = _examples()
    webhooks = {
        COMPLETED_CHANNEL: _webhook(
            COMPLETED_CHANNEL,
            "CompletedMessage",
            examples["completed"],
            "An evaluation completed (task.completed)",
        ),
        FAILED_CHANNEL: _webhook(
            FAILED_CHANNEL,
            "FailedMessage",
            examples["failed"],
            "An evaluation failed (task.failed, or task.rejected with an eval_id)",
        ),
    }
    spec = APISpec(
        title=TITLE,
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        info={"description": _description()},
        webhooks=webhooks,
    )
    spec.tag({"name": "monitoring", "description": "Health and status of this worker."})
    spec.tag({"name": "documentation", "description": "This document and its viewers."})
    spec.tag(
        {
            "name": "events",
            "description": "Redis pub/sub messages, documented as webhooks (not HTTP calls).",
        }
    )
    _register_schemas(spec)
    _register_paths(spec, examples)
    return with_server(spec.to_dict(), server_url)


def with_server(spec: dict[str, Any], server_url: str | None) -> dict[str, Any]:
    """A shallow copy of ``spec`` in canonical key order, with ``server_url`` as its server."""
    out = dict(spec)
    if server_url is not None:
        out["servers"] = [{"url": server_url}]
    ordered = {key: out.pop(key) for key in _ORDER if key in out}
    return {**ordered, **out}


def dump_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2) + "\n"


def dump_yaml(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
