"""A stand-in OTLP/HTTP trace receiver: ``POST /v1/traces`` with protobuf bodies.

It decodes each ``ExportTraceServiceRequest`` (``opentelemetry-proto``) and keeps the
spans it received, flattened (:class:`ReceivedSpan`), for tests and benchmarks. With
``fail_next`` it refuses that many exports (HTTP 400, which the exporter does not retry).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MAX_BODY_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    events: list[str]
    resource: dict[str, Any]


def _value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _attrs(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


@dataclass
class OtlpReceiver:
    """What the receiver got: the spans, the number of requests, the headers seen."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    refused: int = 0
    fail_next: int = 0  # refuse this many more exports
    headers: list[dict[str, str]] = field(default_factory=list)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        found: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans:
            found.setdefault(span.trace_id, []).append(span)
        return found

    def decode(self, body: bytes) -> list[ReceivedSpan]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = _attrs(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex() or None,
                            name=span.name,
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attrs(span.attributes),
                            status_code=span.status.code,
                            status_message=span.status.message,
                            events=[e.name for e in span.events],
                            resource=resource,
                        )
                    )
        return found

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.headers.append(dict(request.headers))
        if self.fail_next > 0:
            self.fail_next -= 1
            self.refused += 1
            return web.Response(status=400, text="refused (test)")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            spans = self.decode(body)
        except Exception as exc:  # a body we cannot read: say so, as a collector would
            return web.Response(status=400, text=f"undecodable: {type(exc).__name__}")
        self.spans += spans
        return web.Response(body=b"", content_type="application/x-protobuf")


OTLP_RECEIVER = web.AppKey("otlp_receiver", OtlpReceiver)


def create_otlp_app() -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    receiver = OtlpReceiver()
    app[OTLP_RECEIVER] = receiver
    app.router.add_post("/v1/traces", receiver.handle)
    return app
