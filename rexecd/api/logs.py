"""``GET /api/containers/{id}/logs``: a container's init output and role-install output,
owner-scoped; ``?follow=true`` keeps the answer open with new output as it comes."""

from __future__ import annotations

import contextlib

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.containers import REF_ERRORS, ref
from rexecd.api.endpoint import Endpoint, Query
from rexecd.api.keys import SERVICE
from rexecd.api.ratelimit import in_flight

_TRUE = ("1", "true", "yes")


async def container_logs(request: web.Request) -> web.StreamResponse:
    follow = request.query.get("follow", "").lower() in _TRUE
    # Resolved before the answer starts: another user's container is a plain 404.
    chunks = await request.app[SERVICE].open_logs(principal(request), ref(request), follow)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except ConnectionResetError:
        return response  # the follower went away
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/api/containers/{id}/logs",
        in_flight("files", container_logs),
        "The container's log: its init's stdout and stderr and its role install's output "
        "(the last logs.max_bytes, 1 MiB by default), as bytes; ?follow=true streams new "
        "output while the container runs",
        "containers",
        response="text/plain",
        errors=REF_ERRORS,
        query=(Query("follow", "keep streaming new output", "boolean"),),
    ),
)
