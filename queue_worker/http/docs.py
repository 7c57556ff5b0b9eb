"""``/openapi.json``, ``/openapi.yaml``, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc).

The viewers' JS and CSS come from the installed ``openapi_ui_bundles`` package
(never a CDN), Swagger UI's start from ``/static/swagger-init.js`` (no inline script: see
the Content-Security-Policy in :mod:`queue_worker.http.auth`), and every text is served as
UTF-8: read as another charset,
``swagger-ui-bundle.js`` fails to parse in Chromium. The four pages are declared in
``ROUTES`` (the viewers' files are not part of the API, so not documented). ``API`` lists
every route table of the worker's HTTP API, which the document describes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from openapi_ui_bundles import redoc, swagger_ui

from queue_worker import __version__
from queue_worker.http import admin, dashboard, handlers, metrics, ops, task_actions, tasks
from queue_worker.openapi import spec as openapi
from queue_worker.openapi.operations import (
    OPENAPI_VERSION,
    TITLE,
    H,
    Handler,
    Response,
    RouteTable,
    Schema,
)
from queue_worker.openapi.spec import dump_json, dump_yaml

JS = "application/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
SWAGGER_FILES = {
    "swagger-ui-bundle.js": JS,
    "swagger-ui-standalone-preset.js": JS,
    "swagger-ui.css": CSS,
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
REDOC_FILES = {"redoc.standalone.js": JS}

# Relative URLs: the pages keep working behind a reverse proxy that adds a path prefix.
SWAGGER_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>queue-worker API - Swagger UI</title>
<link rel="stylesheet" href="docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="docs/static/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/static/swagger-ui-bundle.js" charset="utf-8"></script>
<script src="static/swagger-init.js" charset="utf-8"></script>
</body>
</html>
"""

REDOC_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>queue-worker API - ReDoc</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<redoc spec-url="openapi.json"></redoc>
<script src="redoc/static/redoc.standalone.js" charset="utf-8"></script>
</body>
</html>
"""

ROUTES = RouteTable(tag="documentation", errors=(405,))
DOCUMENT_EXAMPLE = {"openapi": OPENAPI_VERSION, "info": {"title": TITLE, "version": __version__}}
PAGE_EXAMPLE = '<!doctype html><html lang="en"><head><meta charset="utf-8">...</html>'


class SpecCache:
    """The document's two encodings, built on first use.

    The document names no server, so clients resolve its paths against the address
    they fetched it from; nothing of the request (such as its Host header) goes into it.
    """

    def __init__(self) -> None:
        self.encoded: dict[bool, str] = {}

    def text(self, *, as_yaml: bool) -> str:
        if not self.encoded:
            spec = build_spec()
            self.encoded = {False: dump_json(spec), True: dump_yaml(spec)}
        return self.encoded[as_yaml]


SPEC = web.AppKey("openapi_spec", SpecCache)


def _document(
    path: str, summary: str, media: str, schema: Schema, example: object
) -> Callable[[H], H]:
    """Declare a documentation route, whose one answer is what its summary says."""
    return ROUTES.get(
        path, summary=summary, responses={200: Response(summary, media, schema, example)}
    )


@_document("/openapi.json", "This document as JSON", "application/json", "object", DOCUMENT_EXAMPLE)
async def openapi_json(request: web.Request) -> web.Response:
    text = request.app[SPEC].text(as_yaml=False)
    return web.Response(text=text, content_type="application/json", charset="utf-8")


# YAML is a serialization of the same object (clients such as schemathesis parse it as one),
# so its schema and example are the object's, like JSON's.
@_document("/openapi.yaml", "This document as YAML", "application/yaml", "object", DOCUMENT_EXAMPLE)
async def openapi_yaml(request: web.Request) -> web.Response:
    text = request.app[SPEC].text(as_yaml=True)
    return web.Response(text=text, content_type="application/yaml", charset="utf-8")


@_document("/docs", "Swagger UI", "text/html", "string", PAGE_EXAMPLE)
async def swagger_page(request: web.Request) -> web.Response:
    return web.Response(text=SWAGGER_HTML, content_type="text/html", charset="utf-8")


@_document("/redoc", "ReDoc", "text/html", "string", PAGE_EXAMPLE)
async def redoc_page(request: web.Request) -> web.Response:
    return web.Response(text=REDOC_HTML, content_type="text/html", charset="utf-8")


def _static(directory: Path, files: dict[str, str]) -> Handler:
    """Serve the listed files of ``directory`` with their explicit content types."""

    async def static(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        headers = {"Content-Type": files[name], "Cache-Control": "public, max-age=86400"}
        return web.FileResponse(directory / name, headers=headers)

    return static


def register(app: web.Application) -> None:
    """Add the documentation routes to ``app``."""
    app[SPEC] = SpecCache()
    ROUTES.register(app)
    app.router.add_get("/docs/static/{name}", _static(swagger_ui.static_path, SWAGGER_FILES))
    app.router.add_get("/redoc/static/{name}", _static(redoc.static_path, REDOC_FILES))


# The route tables of the worker's HTTP API, in the document's order: the order create_app
# registers them in.
API: tuple[RouteTable, ...] = (
    handlers.ROUTES, tasks.ROUTES, task_actions.ROUTES, admin.ROUTES, metrics.ROUTES,
    ops.ROUTES, dashboard.ROUTES, ROUTES,
)  # fmt: skip


def build_spec(*, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document of the worker's HTTP API, as a dict."""
    return openapi.build_spec(API, server_url=server_url)
