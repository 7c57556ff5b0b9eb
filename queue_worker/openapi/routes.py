"""``/openapi.json``, ``/openapi.yaml``, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc).

The viewers' JS and CSS come from the installed ``openapi_ui_bundles`` package
(never a CDN) and every text is served as UTF-8: read as another charset,
``swagger-ui-bundle.js`` fails to parse in Chromium.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from openapi_ui_bundles import redoc, swagger_ui

from queue_worker.openapi.spec import build_spec, dump_json, dump_yaml, with_server

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
<script>
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
</script>
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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SpecCache:
    """The document, built on first use; its encodings per server URL (a few hosts at most)."""

    max_hosts = 16

    def __init__(self) -> None:
        self.spec: dict[str, Any] | None = None
        self.encoded: dict[tuple[str, bool], str] = {}

    def text(self, request: web.Request, *, as_yaml: bool) -> str:
        server_url = f"{request.scheme}://{request.host}"
        key = (server_url, as_yaml)
        if key not in self.encoded:
            if self.spec is None:
                self.spec = build_spec()
            if len(self.encoded) >= self.max_hosts:
                self.encoded.clear()
            spec = with_server(self.spec, server_url)
            self.encoded[key] = dump_yaml(spec) if as_yaml else dump_json(spec)
        return self.encoded[key]


SPEC = web.AppKey("openapi_spec", SpecCache)


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document as JSON."""
    text = request.app[SPEC].text(request, as_yaml=False)
    return web.Response(text=text, content_type="application/json", charset="utf-8")


async def openapi_yaml(request: web.Request) -> web.Response:
    """The OpenAPI document as YAML."""
    text = request.app[SPEC].text(request, as_yaml=True)
    return web.Response(text=text, content_type="application/yaml", charset="utf-8")


def _page(html: str) -> Handler:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    return page


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
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    app.router.add_get("/openapi.yaml", openapi_yaml, allow_head=False)
    app.router.add_get("/docs", _page(SWAGGER_HTML), allow_head=False)
    app.router.add_get("/redoc", _page(REDOC_HTML), allow_head=False)
    app.router.add_get("/docs/static/{name}", _static(swagger_ui.static_path, SWAGGER_FILES))
    app.router.add_get("/redoc/static/{name}", _static(redoc.static_path, REDOC_FILES))
