"""The application's state keys (one place, imported by the app and the handlers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from queue_worker.config import Settings
from queue_worker.router.formats import FormatGuard
from queue_worker.router.liveness import Liveness
from queue_worker.router.reporter import Reporter
from queue_worker.router.router import Router
from queue_worker.streams.connection import RedisClient
from queue_worker.streams.index import TaskIndex
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore
from queue_worker.streams.tail import TailProjector
from queue_worker.streams.tracing import SpanProjector
from queue_worker.supervisor import Supervisor


@dataclass
class Fate:
    """Set once the process cannot go on: why, and whether tasks in flight still get
    ``SHUTDOWN_GRACE_S`` (not when a peer took this worker over: they are the peer's)."""

    reason: str | None = None
    grace: bool = True
    exit: Callable[[], None] | None = None  # makes the process stop (``queue-worker run``)


SETTINGS = web.AppKey("settings", Settings)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
SESSION = web.AppKey("session", aiohttp.ClientSession)
STORE = web.AppKey("store", EventStore)
STATUS = web.AppKey("status", TailProjector)
PUBLISHER = web.AppKey("publisher", Publisher)
REPORTER = web.AppKey("reporter", Reporter)
TASK_INDEX = web.AppKey("task_index", TaskIndex)
ROUTER = web.AppKey("router", Router)
SPANS: web.AppKey[SpanProjector | None] = web.AppKey("spans")  # None: tracing is off
SUPERVISOR = web.AppKey("supervisor", Supervisor)
LIVENESS = web.AppKey("liveness", Liveness)
FORMATS = web.AppKey("formats", FormatGuard)  # live workers of another stream format
FATE = web.AppKey("fate", Fate)
STARTED = web.AppKey("started_monotonic", float)
