"""The span projector: each task's recorded history becomes its trace (OTLP/HTTP).

Its own consumer group (``tracing``), off unless an OTLP endpoint is configured. It
waits for the entries that end a task (``task.reported``, or ``task.recovered`` with
``lease_lost``: ``spans.ends_task``); every other entry is just acknowledged, with no
Redis work of its own. When a task ends, its entries are found in the task index
(``{<prefix>}:task:<eval_id>``, written by the append script in the same call as the
entry, so it is never behind the stream: ``index.py``), read from the stream (one
pipelined ``XRANGE id id`` each; an entry trimmed away is missing), summarized
(``spans.summarize``) and its spans built (``spans.build``) and exported. At most
``steps_max`` entries per trace are read: the first and the latest. Then the ending
entry's id becomes the task's mark, ``{<prefix>}:traced:<eval_id>``, and the batch is
acknowledged. An ending at or below that mark (a re-delivery) is not exported again,
and a later trace of the same task (handed out again after a ``lease_lost``) starts
after it. An export that fails raises: the batch stays pending, is retried through the
claim and dead-lettered after ``max_deliveries`` like any projector's.

Because the spans come from the index and the stream, a task recovered after a crash,
or whose entries were written by several replicas, gets one whole trace, whichever
replica reads its ending. When the append script could not write the index
(``index_writes_refused``), the trace is built from the entries the index has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from queue_worker.streams.entries import id_key
from queue_worker.streams.projector import Batch, GroupProjector
from queue_worker.streams.spans import TRACED_TYPES, SpanData, Step, build, ends_task, summarize
from queue_worker.streams.store import EventStore

log = structlog.get_logger(__name__)

STEPS_MAX = 256  # entries read per trace (a task retried and throttled a great many times)
MARK_TTL_S = 7 * 24 * 3600  # how long a task's ``traced`` mark stays
EXPORT_TIMEOUT_S = 10.0
# Spans are not urgent: after a batch, wait this long so the next one is larger (fewer
# exports, one HTTP request each). The group projectors' default is 10 ms.
LINGER_MS = 200.0
# The only entry types that can end a task (``spans.ends_task``): the others need no work.
_ENDING_TYPES = frozenset({"task.reported", "task.recovered"})
# What starts a trace after an earlier one ended: the task handed out (or re-recorded) anew.
HANDOUT_TYPES = frozenset({"task.pulled", "task.restored"})

Export = Callable[[list[SpanData]], Awaitable[None]]  # raises when the spans did not go


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
        mark_ttl_s: int = MARK_TTL_S,
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
        self.steps_max = max(2, steps_max)
        self.mark_ttl_s = mark_ttl_s
        self.export_timeout_s = export_timeout_s
        self.traces_exported = 0
        self.spans_exported = 0
        self.repeats_skipped = 0  # endings delivered again after their spans went
        self.export_errors = 0

    async def ensure_group(self, start_id: str = "$") -> None:
        """Created at the stream's end: turning tracing on does not export the whole
        history (a task then in flight gets the spans of what follows)."""
        await super().ensure_group(start_id)

    async def handle(self, batch: Batch) -> None:
        endings: dict[str, list[Step]] = {}  # per task, its endings in the batch
        for _, entry in batch:
            if entry is None or entry.event.type not in _ENDING_TYPES:
                continue  # needs nothing: the index holds it for when its task ends
            step = summarize(entry)
            if step is not None and ends_task(step):
                endings.setdefault(entry.event.eval_id_or_empty, []).append(step)
        if endings:
            await self._finish(endings)
        await self.ack([entry_id for entry_id, _ in batch])

    async def _finish(self, endings: dict[str, list[Step]]) -> None:
        """Build and export the spans of the tasks that ended (those not exported
        before), then mark them exported."""
        keys, redis = self.store.keys, self.redis
        tasks = list(endings)
        async with redis.pipeline(transaction=False) as pipe:  # one round trip for all
            for eval_id in tasks:
                pipe.get(keys.traced(eval_id))
                pipe.zrange(keys.task(eval_id), 0, -1)
            found = await pipe.execute()
        # Per trace: its entries' ids, and whether it follows an earlier ending.
        wanted: list[tuple[str, Step, list[str], bool]] = []
        for i, eval_id in enumerate(tasks):
            mark, indexed = found[2 * i], found[2 * i + 1]
            since = id_key(mark.decode()) if mark is not None else None
            ids = sorted((_text(raw) for raw in indexed), key=id_key)
            for ending in sorted(endings[eval_id], key=lambda s: id_key(s.id)):
                upto = id_key(ending.id)
                if since is not None and upto <= since:
                    self.repeats_skipped += 1  # its spans went before
                    continue
                # Entries after the ending belong to a later handout of the same task,
                # those at or below the mark to an earlier one (its trace went).
                mine = [
                    x for x in ids if (since is None or id_key(x) > since) and id_key(x) <= upto
                ]
                if len(mine) > self.steps_max:  # the first and the latest
                    mine = [mine[0], *mine[len(mine) - self.steps_max + 1 :]]
                wanted.append((eval_id, ending, mine, since is not None))
                since = upto
        if not wanted:
            return
        read = {
            e.id: e for e in await self.store.read_ids([x for _, _, ids, _ in wanted for x in ids])
        }
        spans: list[SpanData] = []
        traces = 0
        for eval_id, ending, ids, after in wanted:
            steps = [ending]  # in the trace even when the index lacks it
            entries = [read[x] for x in ids if x in read]  # trimmed away: missing
            steps += [
                step
                for entry in entries
                if entry.event.eval_id_or_empty == eval_id and (step := summarize(entry))
            ]
            if after and not any(step.type in HANDOUT_TYPES for step in steps):
                # The same outcome reported again (a reporter's re-delivery: the queue
                # answered "already"): no new handout, so no new trace.
                self.repeats_skipped += 1
                continue
            built = build(eval_id, steps)
            if built and built[0].sampled:
                spans += built
                traces += 1
        if spans:
            try:
                await asyncio.wait_for(self.export(spans), self.export_timeout_s)
            except Exception as exc:
                self.export_errors += 1
                raise ExportFailed(f"{len(spans)} spans not exported: {exc!r}"[:300]) from exc
            self.spans_exported += len(spans)
            self.traces_exported += traces
        last = {eval_id: ending.id for eval_id, ending, _, _ in wanted}  # in id order per task
        async with redis.pipeline(transaction=False) as pipe:
            for eval_id, ending_id in last.items():
                pipe.set(keys.traced(eval_id), ending_id, ex=self.mark_ttl_s)
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
