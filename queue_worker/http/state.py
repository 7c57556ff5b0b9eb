"""The application's state keys (one place, imported by the app and the handlers)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from queue_worker.config import Settings
from queue_worker.router.reporter import Reporter
from queue_worker.router.worker import Router
from queue_worker.streams.connection import RedisClient
from queue_worker.streams.projector import TailProjector
from queue_worker.streams.publisher import Publisher
from queue_worker.streams.store import EventStore

SETTINGS = web.AppKey("settings", Settings)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
SESSION = web.AppKey("session", aiohttp.ClientSession)
STORE = web.AppKey("store", EventStore)
STATUS = web.AppKey("status", TailProjector)
PUBLISHER = web.AppKey("publisher", Publisher)
REPORTER = web.AppKey("reporter", Reporter)
ROUTER = web.AppKey("router", Router)
LOOPS = web.AppKey("loops", dict[str, "asyncio.Task[None]"])
STARTED = web.AppKey("started_monotonic", float)
