"""The aiohttp application: middlewares in order, every route, and shutdown of open sockets."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Sequence

from aiohttp import WSCloseCode, web

from rexecd.api import (
    containers,
    events,
    execstream,
    files,
    images,
    logs,
    openapi,
    portforwards,
    stream,
    system,
    terminal,
    tokens,
    volumes,
)
from rexecd.api import exec as exec_
from rexecd.api.auth import auth_middleware, redact_ws_token_logs, scope_middleware
from rexecd.api.endpoint import Endpoint, add_endpoints
from rexecd.api.errors import error_middleware
from rexecd.api.keys import (
    BUILD,
    CONFIG,
    IN_FLIGHT,
    LIMITER,
    OPENAPI,
    SERVICE,
    STORE,
    VERSION,
    WEBSOCKETS,
)
from rexecd.api.ratelimit import add_rate_headers, rate_limit_middleware
from rexecd.config import Config
from rexecd.service.inflight import InFlightLimiter
from rexecd.service.interface import ContainerService
from rexecd.service.ratelimit import RateLimiter
from rexecd.service.store import Store

# The events socket comes before /api/containers/{id}, so "events" is never taken for
# a container reference by the router.
ENDPOINTS: tuple[Endpoint, ...] = (
    *system.ENDPOINTS,
    *events.ENDPOINTS,
    *stream.ENDPOINTS,
    *containers.ENDPOINTS,
    *exec_.ENDPOINTS,
    *execstream.ENDPOINTS,
    *logs.ENDPOINTS,
    *files.ENDPOINTS,
    *portforwards.ENDPOINTS,
    *images.ENDPOINTS,
    *tokens.ENDPOINTS,
    *volumes.ENDPOINTS,
    *terminal.ENDPOINTS,
    openapi.ENDPOINT,
)


async def close_websockets(app: web.Application) -> None:
    """``on_shutdown``: a clean close frame to every open socket before the server stops."""
    sockets = app[WEBSOCKETS]
    # A copy: each handler leaves the set as its socket closes.
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def make_app(
    service: ContainerService,
    store: Store,
    cfg: Config,
    limiter: RateLimiter,
    *,
    version: str,
    build: str,
    extra_routes: Callable[[web.Application], None] | None = None,
    extra_endpoints: Sequence[Endpoint] = (),
) -> web.Application:
    """The API application, ready for an ``AppRunner`` on any number of sites.

    ``extra_endpoints`` are routed and documented in the OpenAPI document;
    ``extra_routes`` may add plain routes (it runs last, before the router freezes).
    Either way they get authentication, scope checks, rate limits and JSON errors.
    """
    redact_ws_token_logs()
    app = web.Application(
        # Outermost first: errors wrap everything, so a 401 or 429 is rendered too.
        middlewares=[error_middleware, auth_middleware, scope_middleware, rate_limit_middleware]
    )
    app[SERVICE] = service
    app[STORE] = store
    app[CONFIG] = cfg
    app[LIMITER] = limiter
    app[IN_FLIGHT] = InFlightLimiter(cfg.concurrency)
    app[VERSION] = version
    app[BUILD] = build
    app[WEBSOCKETS] = weakref.WeakSet[web.WebSocketResponse]()
    endpoints = (*ENDPOINTS, *extra_endpoints)
    add_endpoints(app, endpoints)
    app[OPENAPI] = json.dumps(openapi.build_openapi(endpoints, version=version))
    app.on_response_prepare.append(add_rate_headers)
    app.on_shutdown.append(close_websockets)
    if extra_routes is not None:
        extra_routes(app)
    return app
