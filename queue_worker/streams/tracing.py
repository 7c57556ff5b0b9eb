"""The span projector: each task's recorded history becomes its trace (OTLP/HTTP).

Its own consumer group (``tracing``), off unless an OTLP endpoint is configured. For
every entry of a task (``spans.TRACED_TYPES``) it keeps a small summary (a ``Step``) in
``{<prefix>}:trace:<eval_id>``: a sorted set, so a re-delivered entry adds nothing,
capped at ``steps_max`` steps per task (the first and the latest are kept), with a TTL
so the history of a task that never ends goes. When the task ends (``task.reported``, or
``task.recovered`` with ``lease_lost``) its spans are built (``spans.build``) and
exported; then the ending entry's id becomes the task's mark,
``{<prefix>}:traced:<eval_id>``, and the batch is acknowledged. A re-delivered entry at
or below that mark is neither kept nor exported again. An export that fails raises: the
batch stays pending, is retried through the claim and dead-lettered after
``max_deliveries`` like any projector's.

Because the spans come from the stream, a task recovered after a crash or taken over by
another replica still gets one trace: its entries are all in the stream, whoever wrote
them. Replicas share the group, so a task's entries may be spread over their batches:
when it ends, those still pending elsewhere in the group (not kept yet) are read from the
stream as well (``_unkept``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
import structlog

from queue_worker.streams.entries import LUA_NEWER, id_key
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.spans import (
    TRACED_TYPES,
    SpanData,
    Step,
    build,
    decode_step,
    encode_step,
    ends_task,
    summarize,
)
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

STEPS_MAX = 256  # steps kept per task (a task retried and throttled a great many times)
STEPS_TTL_S = 7 * 24 * 3600  # a task that never ends: its steps go after this long
EXPORT_TIMEOUT_S = 10.0
# Spans are not urgent: after a batch, wait this long so the next one is larger (fewer
# exports, one HTTP request each). The group projectors' default is 10 ms.
LINGER_MS = 200.0
PENDING_LOOK = 512  # entries pending elsewhere in the group looked at for a batch's endings

Export = Callable[[list[SpanData]], Awaitable[None]]  # raises when the spans did not go

# Keeps steps: ARGV[1] = key tag, ARGV[2] = steps kept per task, ARGV[3] = TTL (s), then
# per step: eval_id, entry id, ms, the encoded step. A step at or below the task's
# ``traced`` mark (the ending whose spans went) was part of an exported trace: a
# re-delivery, not kept again. (Only commands of the documented ACL user: README.)
KEEP = (
    LUA_NEWER
    + """
local tag, most, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, 4 do
  local eval_id, id, ms, step = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local done = redis.call('GET', tag .. 'traced:' .. eval_id)
  if not done or newer(id, done) then
    local key = tag .. 'trace:' .. eval_id
    redis.call('ZADD', key, ms, step)
    local n = redis.call('ZCARD', key)
    if n > most then  -- the first step stays, the oldest after it go
      local gone = redis.call('ZRANGE', key, 1, n - most)
      redis.call('ZREM', key, unpack(gone))
    end
    redis.call('PEXPIRE', key, ttl * 1000)
  end
end
return 0
"""
)


class ExportFailed(Exception):
    """The exporter did not deliver the spans."""


class SpanProjector(GroupProjector):
    name = "tracing"
    handles = TRACED_TYPES

    def __init__(
        self,
        store: EventStore,
        group: str,
        consumer: str,
        export: Export,
        *,
        steps_max: int = STEPS_MAX,
        steps_ttl_s: int = STEPS_TTL_S,
        export_timeout_s: float = EXPORT_TIMEOUT_S,
        linger_ms: float = LINGER_MS,
        on_nogroup: Callable[[], Awaitable[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        # kwargs: block_ms, batch, claim_idle_ms, max_deliveries (see GroupProjector)
        super().__init__(
            store, group, consumer, linger_ms=linger_ms, on_nogroup=on_nogroup, **kwargs
        )
        self.export = export
        self.steps_max = steps_max
        self.steps_ttl_s = steps_ttl_s
        self.export_timeout_s = export_timeout_s
        self.traces_exported = 0
        self.spans_exported = 0
        self.repeats_skipped = 0  # endings delivered again after their spans went
        self.export_errors = 0
        self._keep_script = cast(aioredis.Redis, store.redis).register_script(KEEP)

    async def ensure_group(self, start_id: str = "$") -> None:
        """Created at the stream's end: turning tracing on does not export the whole
        history (a task then in flight gets the spans of what follows)."""
        await super().ensure_group(start_id)

    async def handle(self, batch: Batch) -> None:
        steps: list[tuple[str, Step]] = []
        for _, entry in batch:
            step = None if entry is None else summarize(entry)
            if entry is not None and step is not None:
                steps.append((entry.event.eval_id_or_empty, step))
        if steps:
            await self._keep(steps)
        endings = [(eval_id, step) for eval_id, step in steps if ends_task(step)]
        if endings:
            await self._finish(endings, {entry_id for entry_id, _ in batch})
        await self.ack([entry_id for entry_id, _ in batch])

    async def _keep(self, steps: list[tuple[str, Step]]) -> None:
        args: list[Any] = [self.store.keys.tag, self.steps_max, self.steps_ttl_s]
        for eval_id, step in steps:
            args += [eval_id, step.id, step.ts, encode_step(step)]
        await self._keep_script(keys=[self.store.keys.trace_steps(steps[0][0])], args=args)

    async def _unkept(
        self, endings: list[tuple[str, Step]], mine: set[str]
    ) -> list[tuple[str, Step]]:
        """The steps of the ending tasks in entries still pending in the group, below the
        endings, outside this batch: entries another replica (or an earlier, failed batch)
        holds, not kept yet. With several replicas sharing the group, a task's entries are
        spread over their batches: without these its trace would miss some."""
        upto = max((step.id for _, step in endings), key=id_key)
        pending = await self.redis.xpending_range(
            self.stream, self.group, min="-", max=upto, count=len(mine) + PENDING_LOOK
        )
        ids = [_text(p["message_id"]) for p in pending]
        others = [i for i in ids if i not in mine]
        if not others:
            return []
        ending = {eval_id for eval_id, _ in endings}
        found = []
        for entry in await self.store.read_ids(others):
            step = summarize(entry)
            if step is not None and (eval_id := entry.event.eval_id_or_empty) in ending:
                found.append((eval_id, step))
        return found

    async def _finish(self, endings: list[tuple[str, Step]], mine: set[str]) -> None:
        """Build and export the spans of the tasks that ended (those not exported before),
        then mark them exported and drop their steps."""
        keys, redis = self.store.keys, self.redis
        unkept: dict[str, list[Step]] = {}
        for eval_id, step in await self._unkept(endings, mine):
            unkept.setdefault(eval_id, []).append(step)
        spans: list[SpanData] = []
        traces = 0
        done: list[tuple[str, Step, list[bytes]]] = []
        async with redis.pipeline(transaction=False) as pipe:  # one round trip for all
            for eval_id, _ in endings:
                pipe.get(keys.traced(eval_id))
                pipe.zrange(keys.trace_steps(eval_id), 0, -1)
            found = await pipe.execute()
        for i, (eval_id, ending) in enumerate(endings):
            mark, kept = found[2 * i], found[2 * i + 1]
            if mark is not None and id_key(ending.id) <= id_key(mark.decode()):
                self.repeats_skipped += 1  # its spans went before
                continue
            used: list[bytes] = []
            steps: list[Step] = []
            for raw in kept:
                one = decode_step(raw)
                # Steps after the ending belong to a later handout of the same task.
                if one is None or id_key(one.id) <= id_key(ending.id):
                    used.append(raw)
                    if one is not None:
                        steps.append(one)
            later = [u for u in unkept.get(eval_id, ()) if id_key(u.id) <= id_key(ending.id)]
            built = build(eval_id, [*steps, *later, ending])
            if built and built[0].sampled:
                spans += built
                traces += 1
            done.append((eval_id, ending, used))
        if spans:
            try:
                await asyncio.wait_for(self.export(spans), self.export_timeout_s)
            except Exception as exc:
                self.export_errors += 1
                raise ExportFailed(f"{len(spans)} spans not exported: {exc!r}"[:300]) from exc
            self.spans_exported += len(spans)
            self.traces_exported += traces
        if done:
            async with redis.pipeline(transaction=False) as pipe:
                for eval_id, ending, used in done:
                    pipe.set(keys.traced(eval_id), ending.id, ex=self.steps_ttl_s)
                    if used:
                        pipe.zrem(keys.trace_steps(eval_id), *used)
                await pipe.execute()


class OtlpExporter:
    """Exports :class:`SpanData` with the OpenTelemetry SDK's OTLP/HTTP exporter (protobuf).

    Everything is given (endpoint, headers, timeout, compression, resource): nothing is
    left for the SDK to read from the environment but its TLS file variables. The SDK is
    imported here, when tracing is on; its export is synchronous and runs in a thread.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        headers: dict[str, str],
        timeout_s: float,
        compression: str,
        resource: dict[str, str],
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.endpoint = endpoint
        self._exporter = OTLPSpanExporter(
            endpoint=endpoint,
            headers=headers,
            timeout=timeout_s,
            compression=Compression.Gzip if compression == "gzip" else Compression.NoCompression,
        )
        self._resource = Resource(resource)  # not Resource.create: it reads the environment
        self._scope = InstrumentationScope("queue_worker.tracing")

    def readable(self, span: SpanData) -> Any:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        flags = TraceFlags(TraceFlags.SAMPLED if span.sampled else TraceFlags.DEFAULT)
        trace_id = int(span.trace_id, 16)
        context = SpanContext(trace_id, int(span.span_id, 16), False, flags)
        parent = None
        if span.parent_id is not None:
            parent = SpanContext(trace_id, int(span.parent_id, 16), span.remote_parent, flags)
        kinds = {"client": SpanKind.CLIENT, "consumer": SpanKind.CONSUMER}
        status = Status(StatusCode.UNSET)
        if span.error is not None:
            status = Status(StatusCode.ERROR, span.error)
        return ReadableSpan(
            name=span.name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=_attributes(span.attributes),
            events=[Event(n, _attributes(a), ts) for n, ts, a in span.events],
            kind=kinds.get(span.kind, SpanKind.INTERNAL),
            status=status,
            start_time=span.start_ns,
            end_time=span.end_ns,
            instrumentation_scope=self._scope,
        )

    def _export(self, spans: list[SpanData]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = self._exporter.export([self.readable(s) for s in spans])
        if result != SpanExportResult.SUCCESS:
            raise ExportFailed(f"the OTLP exporter answered {result.name} ({self.endpoint})")

    async def __call__(self, spans: list[SpanData]) -> None:
        await asyncio.to_thread(self._export, spans)

    def shutdown(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """What OTLP can carry: no ``None``; anything but str, bool, int, float as text."""
    return {
        k: v if isinstance(v, str | bool | int | float) else str(v)
        for k, v in attrs.items()
        if v is not None
    }
