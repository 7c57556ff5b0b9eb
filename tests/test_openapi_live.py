"""The OpenAPI document against a live worker: schemathesis, and the docs pages in Chromium.

Both talk to a real worker started by ``stack_factory`` (Redis, the devstack queue and
executors). schemathesis calls the API from a worker thread (``asyncio.to_thread``), and
Chromium runs as a subprocess, so the event loop keeps serving the app meanwhile.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup

from tests.browser import WINDOW, chromium, looks_drawn, read_png, run_chromium
from tests.harness import Stack, eventually

# Per operation and generation mode; the operations take no input today, so Hypothesis
# exhausts them long before this, but it bounds the run once they take parameters.
MAX_EXAMPLES = 30
REQUEST_TIMEOUT_S = 10.0
# /health answers 503 when the worker cannot make progress; documented, so not a server error.
SCHEMATHESIS_CONFIG = {
    "operations": [
        {
            "include-name": "GET /health",
            "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
        }
    ]
}
DOCUMENTED = {
    "/", "/dashboard", "/events/stream", "/health", "/health/live", "/status", "/metrics",
    "/openapi.json",
    "/openapi.yaml", "/docs", "/redoc", "/tasks", "/tasks/{eval_id}", "/queue/backlog",
    "/throughput",
}  # fmt: skip
# Every operation: the GETs, and the one POST.
ADMIN_ACTIONS = {("POST", f"/admin/{a}") for a in ("pause", "resume", "drain", "undrain")} | {
    ("POST", f"/tasks/{{eval_id}}/{a}") for a in ("cancel", "retry")
}
OPERATIONS = {("GET", p) for p in DOCUMENTED} | {("POST", "/events/ticket")} | ADMIN_ACTIONS
# What needs a token once one is configured (METRICS_PUBLIC unset).
PROTECTED = {("GET", "/status"), ("GET", "/events/stream"), ("GET", "/metrics"),
             ("POST", "/events/ticket"), ("GET", "/tasks"),
             ("GET", "/tasks/{eval_id}"), ("GET", "/queue/backlog"),
             ("GET", "/throughput")} | ADMIN_ACTIONS  # fmt: skip
READ_TOKEN = "schemathesis-read-token-0123456789"
# An endless Server-Sent Events response cannot be fetched whole and validated like the
# others; tests/test_dashboard.py reads it. Its undeclared methods are still checked here.
ENDLESS = {"/events/stream"}
REDIRECTS = {"/"}
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
# Answers 200 only for an eval_id the stream knows: generated ids get the documented 404.
NEEDS_DATA = {"/tasks/{eval_id}"}

Operation = APIOperation[Any, Any, Any, Any]
ACase = Case[Any]


# --- schemathesis ----------------------------------------------------------------------------


@dataclass
class Run:
    """Calls cases on the live app and validates every response with schemathesis' checks
    (all of its built-in checks: not a server error, status code, content type, headers and
    body conforming to the document, undeclared methods, ...). Failures are collected, so one
    run reports them all."""

    base_url: str
    headers: dict[str, str] = field(default_factory=dict)  # sent with every case
    session: requests.Session = field(default_factory=requests.Session)
    failures: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)  # first full report per failure code
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def __call__(self, case: ACase, **validate: Any) -> schemathesis.Response:
        response = case.call(
            base_url=self.base_url,
            session=self.session,
            headers=self.headers or None,
            timeout=REQUEST_TIMEOUT_S,
            allow_redirects=False,
        )
        request = f"{case.method} {case.formatted_path} -> {response.status_code}"
        self.statuses[(case.method, case.path, response.status_code)] += 1
        try:
            case.validate_response(response, headers=self.headers or None, **validate)
        except FailureGroup as group:
            for failure in group.exceptions:
                summary = failure.message.strip().splitlines()[0] if failure.message else ""
                self.failures.append(f"{request}: {failure.code} {failure.title}: {summary}")
                self.details.setdefault(failure.code, f"{request}\n{group}")
        return response

    def fail(self, request: str, message: str) -> None:
        self.failures.append(f"{request}: {message}")

    def assert_ok(self) -> None:
        report = "\n".join(self.failures) + "\n\n" + "\n\n".join(self.details.values())
        assert not self.failures, f"schemathesis found {len(self.failures)} problems:\n{report}"


async def live_schema(stack: Stack) -> tuple[schemathesis.BaseSchema, list[Operation]]:
    """The document the live app serves, loaded by schemathesis, with every operation in it.

    Loaded from the fetched dict rather than ``from_url``: schemathesis leaves out the
    operation its schema came from, and ``GET /openapi.json`` must be tested too.
    """
    assert stack.worker is not None
    status, raw = await stack.get_json("/openapi.json")
    assert status == 200
    assert "servers" not in raw  # schemathesis is given the base URL below
    config = schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG)
    schema = schemathesis.openapi.from_dict(raw, config=config)
    schema.config.update(base_url=stack.worker.url)
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), results
    assert {(op.method.upper(), op.path) for op in operations} == OPERATIONS
    return schema, operations


def coverage_cases(schema: schemathesis.BaseSchema, operation: Operation) -> Iterator[ACase]:
    """schemathesis' coverage phase: boundary values, malformed headers, undeclared methods."""
    generation = schema.config.generation_for(operation=operation, phase="coverage")
    yield from schema.iter_coverage_cases(
        operation, generation_modes=list(GenerationMode), generation_config=generation
    )


def generate(strategy: st.SearchStrategy[ACase], run: Callable[[ACase], object]) -> None:
    """Run up to ``MAX_EXAMPLES`` cases drawn from ``strategy`` (no shrinking: every failure
    is collected by ``run``, none raised)."""

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        phases=[Phase.explicit, Phase.generate],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def generated(case: ACase) -> None:
        run(case)

    generated()


def fuzz(operation: Operation, run: Callable[[ACase], object]) -> None:
    """schemathesis' examples and fuzzing phases for one operation: the documented request
    examples, generated valid requests and, when it takes any input, invalid ones."""
    examples = operation.get_strategies_from_examples()
    if examples:
        generate(st.one_of(examples), run)
    has_inputs = any(True for _ in operation.iter_parameters()) or any(True for _ in operation.body)
    for mode in list(GenerationMode) if has_inputs else [GenerationMode.POSITIVE]:
        generate(operation.as_strategy(generation_mode=mode), run)


def conformance(schema: schemathesis.BaseSchema, operations: list[Operation], run: Run) -> None:
    for operation in operations:
        if operation.path in ENDLESS:
            continue
        for case in coverage_cases(schema, operation):
            if case.method.upper() == operation.method.upper():
                run(case)
        fuzz(operation, run)


def undeclared_methods(
    schema: schemathesis.BaseSchema, operations: list[Operation], run: Run
) -> dict[str, set[str]]:
    """Every method a path does not document, as the coverage phase sends them: a 405 whose
    ``Allow`` names the documented method and HEAD."""
    sent: dict[str, set[str]] = {}
    for operation in operations:
        methods = sent.setdefault(operation.path, set())
        allowed = {operation.method.upper()} | (
            {"HEAD"} if operation.method.upper() == "GET" else set()
        )
        for case in coverage_cases(schema, operation):
            if case.method.upper() != operation.method.upper():
                methods.add(case.method.upper())
                response = run(case)
                # Names are lower-cased here; a missing Allow is reported (required).
                allow = ",".join(response.headers.get("allow", []))
                if allow and {m.strip().upper() for m in allow.split(",")} != allowed:
                    request = f"{case.method} {operation.path} -> {response.status_code}"
                    run.fail(request, f"Allow: {allow}, not {sorted(allowed)}")
    return sent


def head_requests(operations: list[Operation], run: Run) -> dict[str, tuple[int, int]]:
    """HEAD of every documented GET path, which the document leaves implied (RFC 9110): the
    status a GET gets, and no body. The endless stream's GET is not sent."""
    statuses = {}
    for operation in operations:
        if operation.method.upper() != "GET":
            continue
        url = run.base_url + operation.path
        head = run.session.head(url, timeout=REQUEST_TIMEOUT_S, allow_redirects=False)
        assert head.content == b"", operation.path
        if operation.path in ENDLESS:
            statuses[operation.path] = (head.status_code, 200)
            continue
        get = run.session.get(url, timeout=REQUEST_TIMEOUT_S, allow_redirects=False)
        assert head.headers.get("Content-Type") == get.headers.get("Content-Type")
        statuses[operation.path] = (head.status_code, get.status_code)
    return statuses


async def test_schemathesis_operations_conform(stack_factory) -> None:
    """Every documented operation, called with a read token: no 5xx, status, content type,
    headers and body as documented; the same calls without the token are refused (401)."""
    stack: Stack = await stack_factory(api_token=(("schemathesis", READ_TOKEN),))
    assert stack.worker is not None
    await eventually(lambda: _health_is(stack, 200))
    schema, operations = await live_schema(stack)
    run = Run(stack.worker.url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    await asyncio.to_thread(conformance, schema, operations, run)
    run.assert_ok()
    ok = {(method, path) for method, path, status in run.statuses if status == 200}
    unfit = ENDLESS | REDIRECTS | NEEDS_DATA
    # The admin actions answer a read token 403 (tests/test_control.py acts with one).
    expected = {(m, p) for m, p in OPERATIONS - ADMIN_ACTIONS if p not in unfit}
    assert ok == expected, run.statuses
    assert all(status == 302 for method, path, status in run.statuses if path in REDIRECTS)
    stream = schema.raw_schema["paths"]["/events/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert stream["security"] == [{"bearerAuth": []}]

    # The documented 503 of /health: no executor left, so the worker cannot make progress.
    for executor in stack.executors:
        await executor.stop()
    await eventually(lambda: _health_is(stack, 503))
    health = next(op for op in operations if op.path == "/health")
    cases = [c for c in coverage_cases(schema, health) if c.method == "GET"]
    responses = await asyncio.to_thread(lambda: [run(case) for case in cases])
    run.assert_ok()
    assert responses
    assert {r.status_code for r in responses} == {503}


async def test_schemathesis_without_a_token_every_protected_route_is_401(stack_factory) -> None:
    """With a token configured, every case schemathesis makes for a protected operation
    (the event stream included: it is refused before it starts) gets the documented JSON 401;
    the open ones still answer."""
    stack: Stack = await stack_factory(api_token=(("schemathesis", READ_TOKEN),))
    assert stack.worker is not None
    await eventually(lambda: _health_is(stack, 200))
    schema, operations = await live_schema(stack)
    run = Run(stack.worker.url)

    def call_all() -> None:
        for operation in operations:
            for case in coverage_cases(schema, operation):
                if case.method.upper() == operation.method.upper():
                    run(case)
            fuzz(operation, run)

    await asyncio.to_thread(call_all)
    run.assert_ok()
    by_operation: dict[tuple[str, str], set[int]] = {}
    for method, path, status in run.statuses:
        by_operation.setdefault((method, path), set()).add(status)
    assert set(by_operation) == OPERATIONS
    for operation, statuses in by_operation.items():
        if operation in PROTECTED:
            assert statuses == {401}, (operation, statuses)
        else:
            assert 401 not in statuses, (operation, statuses)


async def test_schemathesis_undeclared_methods(stack_factory) -> None:
    """Methods a path does not document get the documented 405, with ``Allow`` (RFC 9110);
    HEAD answers like GET."""
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    await eventually(lambda: _health_is(stack, 200))  # the same /health status for HEAD and GET
    schema, operations = await live_schema(stack)
    run = Run(stack.worker.url)
    sent = await asyncio.to_thread(undeclared_methods, schema, operations, run)
    declared = {path: method for method, path in OPERATIONS}
    assert {path: methods >= METHODS - {declared[path]} for path, methods in sent.items()} == {
        path: True for path in declared
    }
    assert {status for _, _, status in run.statuses} == {405}, run.statuses
    run.assert_ok()
    heads = await asyncio.to_thread(head_requests, operations, run)
    assert set(heads) == DOCUMENTED
    assert all(head == get for head, get in heads.values()), heads
    # /tasks needs its state (400), /tasks/{eval_id} a task the stream knows (404).
    expected = {p: 302 if p in REDIRECTS else 200 for p in heads}
    expected |= {"/tasks": 400, "/tasks/{eval_id}": 404}
    assert {p: head for p, (head, _) in heads.items()} == expected, heads


async def _health_is(stack: Stack, expected: int) -> bool:
    status, _ = await stack.get_json("/health")
    return status == expected


# --- Chromium --------------------------------------------------------------------------------

# What each viewer renders from the document (none of it is in the page's own HTML), and
# what it shows when it could not load the document.
PAGES = {
    "/docs": (
        ['data-path="/health"', 'data-path="/status"', "Service health with executor status"],
        ["Failed to load API definition", "Fetch error"],
    ),
    "/redoc": (
        ["/health", "/status", "Service health with executor status"],
        ["Something went wrong", "Error downloading"],
    ),
}


def test_read_png_tells_blank_from_drawn() -> None:
    """The blank check below on PNGs made here: one colour, and a gradient."""

    def png(rows: list[bytes], width: int) -> bytes:
        def chunk(kind: bytes, body: bytes) -> bytes:
            crc = zlib.crc32(kind + body)
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

        header = struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0)
        image = zlib.compress(b"".join(b"\0" + row for row in rows))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", image)

    blank = read_png(png([b"\xff" * 300] * 200, 100))
    assert (blank.width, blank.height) == (100, 200)
    assert not looks_drawn(blank)
    drawn = read_png(png([bytes((x * y) % 256 for x in range(300)) for y in range(200)], 100))
    assert looks_drawn(drawn)


@pytest.mark.parametrize("page", sorted(PAGES))
async def test_docs_page_renders_in_chromium(stack_factory, tmp_path: Path, page: str) -> None:
    """The viewer renders the operations from local files only (no CDN), and is not blank."""
    chromium()
    stack: Stack = await stack_factory()
    assert stack.worker is not None
    url = stack.worker.url + page
    dom = (await run_chromium(tmp_path / "profile-dom", "--dump-dom", url)).decode()
    shown, errors = PAGES[page]
    missing = [text for text in shown if text not in dom]
    assert not missing, f"{page} does not show {missing}; DOM:\n{dom[:3000]}"
    assert not [text for text in errors if text in dom], dom[:3000]

    shot = tmp_path / "page.png"
    size = "--window-size={},{}".format(*WINDOW)
    await run_chromium(tmp_path / "profile-shot", f"--screenshot={shot}", size, url)
    image = read_png(shot.read_bytes())
    assert (image.width, image.height) == WINDOW
    assert looks_drawn(image), f"{page}: the screenshot {shot} looks blank"
