"""The OpenAPI 3.1 document: the HTTP API, the event stream and the pub/sub messages.

The paths come from walking the route tables given to :func:`build_spec` (the HTTP API's
are listed in :mod:`queue_worker.http.docs`), the declarations that also register each route
(:mod:`queue_worker.openapi.operations`); the schemas are the JSON Schemas msgspec derives
from our Structs. So the document cannot drift from the code. Pure: no I/O, no running app
needed, and nothing of ``http`` imported (it is the other way round).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import msgspec
import yaml
from apispec import APISpec

from queue_worker import __version__
from queue_worker.openapi import examples as ex
from queue_worker.openapi.operations import (
    OPENAPI_VERSION,
    REF_TEMPLATE,
    TITLE,
    Operation,
    Parameter,
    Response,
    RouteTable,
    Schema,
    json_body,
)
from queue_worker.streams import events as ev
from queue_worker.streams.keys import COMPLETED_CHANNEL, FAILED_CHANNEL, Keys

BODY_METHODS = ("POST", "PUT", "PATCH")  # operations that take a request body
_ORDER = ("openapi", "info", "servers", "tags", "paths", "webhooks", "components")
TAGS = (
    {"name": "monitoring", "description": "Health and status of this worker."},
    {"name": "documentation", "description": "This document and its viewers."},
    {
        "name": "events",
        "description": "Redis pub/sub messages, documented as webhooks (not HTTP calls).",
    },
)

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
and `XACK` each entry once handled. Each `task.completed`, `task.failed` and \
`task.rejected` entry is also copied, under the same id and with the same fields, to the \
outcome stream `{{<prefix>}}:outcomes` (`{Keys().outcomes}`), which the publisher's and the \
reporter's consumer groups read; a service that needs only outcomes may read that one."""


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
monitoring and documentation; every error it returns is a JSON `ErrorResponse`, never HTML. \
Every `GET` operation also answers `HEAD` (RFC 9110): the same status and headers, no body. \
A request body larger than `HTTP_MAX_BODY_BYTES` (default 65536 bytes) gets 413 \
(`ContentTooLarge`), on any path.

## Event stream

{STREAM_DESCRIPTION}

{_event_table()}

## Pub/sub messages

Terminal events are published by the publisher projector as Redis `PUBLISH` on the channels \
`{COMPLETED_CHANNEL}` (`CompletedMessage`) and `{FAILED_CHANNEL}` (`FailedMessage`), \
documented below as webhooks. `PUBLISH` and the `XACK` of the stream entries run in one \
atomic script, so a message is neither sent twice nor skipped by a crash of the worker; pub/sub \
itself delivers only to subscribers connected at that moment (use a consumer group on the \
stream for durable delivery).

A message is at most `PUBLISH_MAX_BYTES` (default 1 MiB). Above it, the `output` and `error` \
strings of its `result` (and a failure's own `error` when needed) are cut so that it fits, and \
it carries `"truncated": true` and `"result_key"`, the Redis key of the full result \
(`{{<prefix>}}:result:<eval_id>`, kept 7 days; absent when no longer kept). A message under the \
cap is unchanged: neither field appears."""


# The shared answers of every operation (components): ``Operation.errors`` lists which apply;
# 413 applies to every operation that takes a request body.
ERRORS = {
    401: (
        "Unauthorized",
        json_body(
            "No valid credentials: no bearer token or an unknown one (or an unknown, used or "
            "expired ticket), or, with no token configured, a client that is not on loopback "
            "(the detail tells how to set a token).",
            ex.UNAUTHORIZED,
            headers={
                "WWW-Authenticate": {
                    "description": "`Bearer`: the scheme to authenticate with.",
                    "required": True,
                    "schema": {"type": "string"},
                    "example": 'Bearer realm="queue-worker"',
                }
            },
        ),
    ),
    413: (
        "ContentTooLarge",
        json_body(
            "The request body is larger than `HTTP_MAX_BODY_BYTES` (default 65536 bytes).",
            ex.TOO_LARGE,
        ),
    ),
    404: ("NotFound", json_body("No such route.", ex.NOT_FOUND)),
    405: (
        "MethodNotAllowed",
        json_body(
            "The path exists, but not for this method (e.g. `POST`).",
            ex.NOT_ALLOWED,
            headers={
                "Allow": {
                    "description": "The methods this path supports (RFC 9110): `GET,HEAD`.",
                    "required": True,
                    "schema": {"type": "string"},
                    "example": "GET,HEAD",
                }
            },
        ),
    ),
}


SECURITY_SCHEME = "bearerAuth"
WHOLE = "Under PUBLISH_MAX_BYTES: the result as is"
# The pub/sub messages: channel, summary, and examples by name (summary, message).
WEBHOOKS: tuple[tuple[str, str, dict[str, tuple[str, msgspec.Struct]]], ...] = (
    (
        COMPLETED_CHANNEL,
        "An evaluation completed (task.completed)",
        {
            "whole": (WHOLE, ex.COMPLETED),
            "truncated": (
                "Over PUBLISH_MAX_BYTES: output cut (shortened here), the full result kept",
                ex.COMPLETED_TRUNCATED,
            ),
        },
    ),
    (
        FAILED_CHANNEL,
        "An evaluation failed (task.failed, or task.rejected with an eval_id)",
        {"whole": (WHOLE, ex.FAILED)},
    ),
)


def _schema(schema: Schema) -> dict[str, Any]:
    if isinstance(schema, str):
        return {"type": schema}
    if isinstance(schema, tuple):
        return {"anyOf": [_schema(one) for one in schema]}
    return {"$ref": REF_TEMPLATE.format(name=schema.__name__)}


def _response(response: Response) -> dict[str, Any]:
    out: dict[str, Any] = {"description": response.description}
    if response.headers:
        out["headers"] = {name: dict(header) for name, header in response.headers.items()}
    if response.media is not None:
        media: dict[str, Any] = {"schema": _schema(response.schema)}
        if response.example is not None:
            media["example"] = msgspec.to_builtins(response.example)
        out["content"] = {response.media: media}
    return out


def _parameter(parameter: Parameter) -> dict[str, Any]:
    return {
        "name": parameter.name,
        "in": parameter.location,
        "required": parameter.required,
        "description": parameter.description,
        "schema": dict(parameter.schema),
    }


def _operation(op: Operation) -> dict[str, Any]:
    """The OpenAPI operation object of one declaration."""
    out: dict[str, Any] = {"tags": [op.tag], "summary": op.summary}
    if op.operation_id is not None:
        out["operationId"] = op.operation_id
    if op.description is not None:
        out["description"] = op.description
    if op.parameters:
        out["parameters"] = [_parameter(p) for p in op.parameters]
    if op.body is not None:
        schema = {"$ref": REF_TEMPLATE.format(name=op.body.__name__)}
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    responses = {str(code): _response(r) for code, r in op.responses.items()}
    errors = op.errors
    if op.access != "open":
        out["security"] = [{SECURITY_SCHEME: []}]
        errors = (401, *errors)
    if op.method in BODY_METHODS:
        errors = (*errors, 413)
    for code in errors:
        responses[str(code)] = {"$ref": f"#/components/responses/{ERRORS[code][0]}"}
    out["responses"] = responses
    return out


def _register_schemas(spec: APISpec, operations: list[Operation]) -> None:
    """Every Struct a response names, every stream event (``StreamEvent``, their union) and
    the pub/sub messages."""
    answered: list[Schema] = [r.schema for op in operations for r in op.responses.values()]
    answered += [r.schema for _, r in ERRORS.values()]
    answered = [one for t in answered for one in (t if isinstance(t, tuple) else (t,))]
    answered += [op.body for op in operations if op.body is not None]
    published = [type(m) for _, _, examples in WEBHOOKS for _, m in examples.values()]
    types = dict.fromkeys(t for t in [*answered, *published] if isinstance(t, type))
    (union, *_), components = msgspec.json.schema_components(
        [ev.AnyEvent, *ev.EVENT_TYPES, *types], ref_template=REF_TEMPLATE
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


def _register_paths(spec: APISpec, operations: list[Operation]) -> None:
    spec.components.security_scheme(
        SECURITY_SCHEME,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "An `API_TOKEN` (read) or `ADMIN_TOKEN` (admin, reads too). With "
            "no token configured, loopback clients need none; `AUTH_DISABLED=true` opens the "
            "API; `METRICS_PUBLIC=true` opens `/metrics`.",
        },
    )
    for name, response in ERRORS.values():
        spec.components.response(name, _response(response))
    for op in operations:
        spec.path(path=op.path, operations={op.method.lower(): _operation(op)})


def _webhook(
    channel: str, summary: str, examples: dict[str, tuple[str, msgspec.Struct]]
) -> dict[str, Any]:
    """A Redis ``PUBLISH`` on ``channel``, described as a webhook of its message's schema."""
    (_, first), *_ = examples.values()
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
                        "schema": _schema(type(first)),
                        "examples": {
                            name: {"summary": text, "value": msgspec.to_builtins(value)}
                            for name, (text, value) in examples.items()
                        },
                    }
                },
            },
        }
    }


def build_spec(tables: Iterable[RouteTable], *, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document of the routes declared in ``tables`` (in that order), as a dict;
    ``server_url`` becomes its only server."""
    operations = [op for table in tables for op in table]
    spec = APISpec(
        title=TITLE,
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        info={"description": _description()},
        webhooks={
            channel: _webhook(channel, summary, examples) for channel, summary, examples in WEBHOOKS
        },
    )
    for tag in TAGS:
        spec.tag(tag)
    _register_schemas(spec, operations)
    _register_paths(spec, operations)
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
