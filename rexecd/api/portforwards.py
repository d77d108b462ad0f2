"""Port-forward endpoints: 127.0.0.1:host_port on the daemon's host to a container's port."""

from __future__ import annotations

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.containers import REF_ERRORS, ref
from rexecd.api.endpoint import Endpoint
from rexecd.api.keys import SERVICE
from rexecd.api.wire import read_model, respond
from rexecd.models import (
    PortForwardCreate,
    PortForwardDeleted,
    PortForwardList,
    PortForwardOut,
)


async def add_port_forward(request: web.Request) -> web.Response:
    body = await read_model(request, PortForwardCreate)
    fwd = await request.app[SERVICE].add_port_forward(principal(request), ref(request), body)
    return respond(fwd, status=201)


async def list_port_forwards(request: web.Request) -> web.Response:
    items = await request.app[SERVICE].list_port_forwards(principal(request), ref(request))
    return respond(PortForwardList(port_forwards=items, count=len(items)))


async def delete_port_forward(request: web.Request) -> web.Response:
    fwd = await request.app[SERVICE].delete_port_forward(
        principal(request), ref(request), request.match_info["forward_id"]
    )
    return respond(
        PortForwardDeleted(
            message="port forward deleted",
            id=fwd.id,
            container_id=fwd.container_id,
            host_port=fwd.host_port,
            protocol=fwd.protocol,
        )
    )


_PF = "/api/containers/{id}/port-forwards"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        _PF,
        add_port_forward,
        "Forward a host loopback port (given, or chosen from the daemon's range) to a "
        "port of a running container",
        "port-forwards",
        body=PortForwardCreate,
        response=PortForwardOut,
        status=201,
        # 400: bad body or host_port outside the range; 403: the tier's limit per
        # container; 409: not running, no network, or the host port is taken;
        # 503: no free port left in the range, or networking is off.
        errors=(400, *REF_ERRORS, 409, 503),
    ),
    Endpoint(
        "GET",
        _PF,
        list_port_forwards,
        "List a container's port forwards",
        "port-forwards",
        response=PortForwardList,
        errors=REF_ERRORS,
    ),
    Endpoint(
        "DELETE",
        f"{_PF}/{{forward_id}}",
        delete_port_forward,
        "Remove a port forward",
        "port-forwards",
        response=PortForwardDeleted,
        errors=REF_ERRORS,
    ),
)
