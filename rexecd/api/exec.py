"""``POST /containers/{id}/exec``: run a command to completion and answer its output."""

from __future__ import annotations

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.containers import REF_ERRORS, ref
from rexecd.api.endpoint import Endpoint
from rexecd.api.keys import SERVICE
from rexecd.api.ratelimit import in_flight
from rexecd.api.wire import read_model, respond_json
from rexecd.models import ExecRequest, ExecResult


async def exec_command(request: web.Request) -> web.Response:
    body = await read_model(request, ExecRequest)
    status, result = await request.app[SERVICE].exec(principal(request), ref(request), body)
    # 504 carries the partial output in the same shape as a 200.
    return respond_json(result, status=status)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/api/containers/{id}/exec",
        in_flight("exec", exec_command),
        "Run a command (sh -c string or argv) to completion; 504 with partial output on timeout",
        "exec",
        body=ExecRequest,
        response=ExecResult,
        errors=(400, *REF_ERRORS, 409, 504),
        rate="exec",
    ),
)
