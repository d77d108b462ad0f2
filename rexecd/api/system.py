"""Daemon-level endpoints: ``GET /health`` (no auth) and ``GET /api/version``."""

from __future__ import annotations

from aiohttp import web

from rexecd.api.endpoint import Endpoint
from rexecd.api.keys import BUILD, SERVICE, VERSION
from rexecd.api.wire import respond
from rexecd.models import Health, Version


async def health(request: web.Request) -> web.Response:
    return respond(await request.app[SERVICE].health())


async def version(request: web.Request) -> web.Response:
    return respond(Version(version=request.app[VERSION], build=request.app[BUILD]))


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/health",
        health,
        "Liveness and container counts",
        "system",
        response=Health,
        authenticated=False,
    ),
    # auth.required_scope treats /api/health as public too; some clients prefix every path.
    Endpoint(
        "GET",
        "/api/health",
        health,
        "Alias of /health",
        "system",
        response=Health,
        authenticated=False,
    ),
    Endpoint(
        "GET",
        "/api/version",
        version,
        "Daemon version and build",
        "system",
        response=Version,
        errors=(401, 429),
    ),
)
