"""OpenAPI document and docs pages (filled in by the OpenAPI work)."""

from __future__ import annotations

from aiohttp import web


def register(app: web.Application) -> None:
    """Add the documentation routes to ``app``."""
