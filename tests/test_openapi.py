"""The OpenAPI document: valid, complete, served with the docs pages over real HTTP."""

from __future__ import annotations

import argparse
import json
import re

import aiohttp
import pytest
import yaml
from aiohttp import web
from openapi_spec_validator import validate

from queue_worker.commands import openapi as cli
from queue_worker.config import Settings
from queue_worker.devstack.serve import Server
from queue_worker.http import dashboard
from queue_worker.http import docs as routes
from queue_worker.http.app import create_app
from queue_worker.http.docs import API, build_spec
from queue_worker.streams.events import EVENT_TYPES, event_type_names

STATIC_PREFIXES = ("/docs/static/", "/redoc/static/", "/static/")


def test_spec_is_valid_openapi() -> None:
    spec = build_spec(server_url="http://worker:8084")
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    assert spec["servers"] == [{"url": "http://worker:8084"}]
    schemas = spec["components"]["schemas"]
    assert {"HealthResponse", "StatusResponse", "ErrorResponse", "StreamEvent"} <= set(schemas)
    assert {"CompletedMessage", "FailedMessage"} <= set(schemas)
    assert all(cls.__name__ in schemas for cls in EVENT_TYPES)
    stream_event = schemas["StreamEvent"]
    assert stream_event["discriminator"]["propertyName"] == "type"
    assert sorted(stream_event["discriminator"]["mapping"]) == sorted(event_type_names())
    assert set(spec["webhooks"]) == {"evaluation:completed", "evaluation:failed"}
    for name in ("CompletedMessage", "FailedMessage"):  # cut to PUBLISH_MAX_BYTES: documented
        assert {"truncated", "result_key"} <= set(schemas[name]["properties"])
        assert {"truncated", "result_key"}.isdisjoint(schemas[name]["required"])
    completed = spec["webhooks"]["evaluation:completed"]["post"]["requestBody"]["content"]
    truncated = completed["application/json"]["examples"]["truncated"]["value"]
    assert truncated["truncated"] is True and truncated["result_key"].endswith(":result:eval-44")


def test_every_route_is_documented() -> None:
    app = create_app(Settings())
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not route.resource.canonical.startswith(STATIC_PREFIXES)
    }
    paths = build_spec()["paths"]
    documented = {(path, method) for path, item in paths.items() for method in item}
    assert served == documented


def test_routes_are_registered_from_their_declarations() -> None:
    """Each documented operation is served by the very handler declared with it, on its path,
    for its method and for HEAD (implied by every GET); no route is registered otherwise."""
    app = create_app(Settings())
    served = {
        (route.resource.canonical, route.method): route.handler
        for route in app.router.routes()
        if route.resource is not None and not route.resource.canonical.startswith(STATIC_PREFIXES)
    }
    declared = {
        (op.path, method): op.handler
        for table in API
        for op in table
        for method in ((op.method, "HEAD") if op.method == "GET" else (op.method,))
    }
    assert served == declared
    assert {method for _, method in declared} == {"GET", "HEAD", "POST"}


def _local_urls(html: str) -> list[str]:
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert urls
    return urls


async def test_docs_are_served() -> None:
    app = web.Application()
    routes.register(app)
    app.router.add_get("/static/{name}", dashboard.static_file)  # swagger-init.js
    timeout = aiohttp.ClientTimeout(total=10)
    async with Server(app) as server, aiohttp.ClientSession(timeout=timeout) as http:

        async def get(path: str, content_type: str) -> str:
            async with http.get(server.url + path) as resp:
                assert resp.status == 200, path
                assert resp.headers["Content-Type"] == f"{content_type}; charset=utf-8", path
                return await resp.text()

        as_json = json.loads(await get("/openapi.json", "application/json"))
        as_yaml = yaml.safe_load(await get("/openapi.yaml", "application/yaml"))
        assert as_json == as_yaml == build_spec()
        assert "servers" not in as_json  # paths resolve against where it was fetched
        validate(as_json)
        for path in ("/openapi.json", "/openapi.yaml"):  # nothing of the request echoed
            headers = {"Host": "attacker.example", "X-Forwarded-Host": "attacker.example"}
            async with http.get(server.url + path, headers=headers) as resp:
                assert resp.status == 200 and "attacker" not in await resp.text()
        for page in ("/docs", "/redoc"):
            html = await get(page, "text/html")
            assert '<meta charset="utf-8">' in html
            for url in _local_urls(html):
                assert not url.startswith(("http://", "https://", "//")), url
                if url.endswith(".js"):
                    script = await get("/" + url, "application/javascript")
                    if url.startswith("static/"):  # the page's own start: no inline script
                        assert "openapi.json" in script
                    else:
                        assert len(script) > 100_000
            assert "<script>" not in html
        async with http.get(server.url + "/docs/static/index.html") as resp:
            assert resp.status == 404


@pytest.mark.parametrize("as_yaml", [False, True])
def test_openapi_command(capsys: pytest.CaptureFixture[str], as_yaml: bool) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["openapi", *(["--yaml"] if as_yaml else [])])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    spec = yaml.safe_load(out) if as_yaml else json.loads(out)
    validate(spec)
    assert spec == build_spec()
