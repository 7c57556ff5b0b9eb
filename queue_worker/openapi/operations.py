"""The HTTP API declared once per operation, next to its handler.

A module declares its routes in a :class:`RouteTable`::

    ROUTES = RouteTable(tag="monitoring")

    @ROUTES.get("/health", summary="...", responses={200: json_body("...", example)})
    async def health(request: web.Request) -> web.Response: ...

``ROUTES.register(app)`` adds them to an aiohttp app (every ``GET`` also answers ``HEAD``,
which the document leaves implied), and :mod:`queue_worker.openapi.spec` builds the OpenAPI
document by walking the same declarations: a route cannot be served undocumented, nor
documented with another path, method or body than it has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
from aiohttp import hdrs, web

OPENAPI_VERSION = "3.1.0"
TITLE = "queue-worker"
REF_TEMPLATE = "#/components/schemas/{name}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)
# A component (by its Struct), one of several (anyOf), or a JSON type's name.
Schema = type[msgspec.Struct] | tuple[type[msgspec.Struct], ...] | str
# Who may call an operation: anyone ("open"), a read or admin token ("read"), an admin token
# ("admin"); "metrics" is "read" unless METRICS_PUBLIC. See queue_worker.http.auth.
Access = Literal["open", "read", "metrics", "admin"]


@dataclass(frozen=True)
class Response:
    """A documented response: what it means, and its body (media type, schema, example)."""

    description: str
    media: str | None = None  # None: no body
    schema: Schema = "string"
    example: Any = None  # a Struct or JSON-like value; None: no example
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def json_body(
    description: str,
    example: msgspec.Struct,
    headers: Mapping[str, Mapping[str, Any]] = {},
    *,
    also: tuple[type[msgspec.Struct], ...] = (),
) -> Response:
    """A JSON response whose schema is the component of ``example``'s type (or, with
    ``also``, any of it and those)."""
    schema: Schema = (type(example), *also) if also else type(example)
    return Response(description, "application/json", schema, example, headers)


@dataclass(frozen=True)
class Parameter:
    name: str
    location: Literal["query", "header", "path"]
    description: str
    schema: Mapping[str, Any]
    required: bool = False


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One route and its documentation. ``errors`` are the statuses answered with a shared
    error response (a component of the document), after ``responses``."""

    method: str
    path: str
    handler: Handler
    tag: str
    summary: str
    operation_id: str | None = None
    description: str | None = None
    parameters: tuple[Parameter, ...] = ()
    responses: Mapping[int, Response]
    errors: tuple[int, ...] = ()
    access: Access = "open"
    body: type[msgspec.Struct] | None = None  # the JSON request body, when it takes one


class RouteTable:
    """The operations of one module, in order, with the tag and shared errors they have."""

    def __init__(self, *, tag: str, errors: tuple[int, ...] = (404, 405)) -> None:
        self.tag = tag
        self.errors = errors
        self.operations: list[Operation] = []

    def get(
        self,
        path: str,
        *,
        summary: str,
        responses: Mapping[int, Response],
        operation_id: str | None = None,
        description: str | None = None,
        parameters: tuple[Parameter, ...] = (),
        access: Access = "open",
    ) -> Callable[[H], H]:
        """Declare the decorated handler as ``GET path`` (``HEAD`` implied)."""
        return self.route(
            hdrs.METH_GET,
            path,
            summary=summary,
            responses=responses,
            operation_id=operation_id,
            description=description,
            parameters=parameters,
            access=access,
        )

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        responses: Mapping[int, Response],
        operation_id: str | None = None,
        description: str | None = None,
        parameters: tuple[Parameter, ...] = (),
        access: Access = "open",
        body: type[msgspec.Struct] | None = None,
    ) -> Callable[[H], H]:
        """Declare the decorated handler as ``method path`` (taking ``body`` as JSON)."""

        def declare(handler: H) -> H:
            self.operations.append(
                Operation(
                    method=method,
                    path=path,
                    handler=handler,
                    tag=self.tag,
                    summary=summary,
                    operation_id=operation_id,
                    description=description,
                    parameters=parameters,
                    responses=responses,
                    errors=self.errors,
                    access=access,
                    body=body,
                )
            )
            return handler

        return declare

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    def register(self, app: web.Application) -> None:
        """Add every operation's route to ``app``; a ``GET`` answers ``HEAD`` too."""
        for op in self.operations:
            if op.method == hdrs.METH_GET:
                app.router.add_get(op.path, op.handler)
            else:
                app.router.add_route(op.method, op.path, op.handler)
