"""The description of one HTTP endpoint: the one place a route's contract is declared.

The router, the OpenAPI generator and the middlewares all read it: its path and
handler, what its request and answers look like, the token scope it needs and the
rate class it counts in. Adding a route is adding one ``Endpoint`` to a module's
``ENDPOINTS`` (and that tuple to ``api.app.ENDPOINTS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from rexecd.models import Scope
from rexecd.service.ratelimit import RateClass

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    description: str
    type: Literal["string", "integer", "number", "boolean"] = "string"
    required: bool = False


def method_scope(method: str) -> Scope:
    """The scope a route needs unless it says otherwise: reads ``read``, changes ``write``.

    Also the scope of a request that matched no route (its 404 or 405 is answered after
    authentication, as for a real route, so the answer tells nothing to a stranger)."""
    return "read" if method.upper() in _READ_METHODS else "write"


def method_rate(method: str) -> RateClass:
    """The rate class of a route unless it says otherwise, and of an unmatched request."""
    return "read" if method.upper() in _READ_METHODS else "ops"


@dataclass(frozen=True, slots=True)
class WsFrames:
    """The frames of a WebSocket endpoint either way, for the OpenAPI document: the
    client's ``first`` text frame, the JSON text frames each side may send (one model
    per kind, told apart by ``type``), and what binary frames carry (None: none)."""

    first: type[BaseModel] | None
    client: tuple[type[BaseModel], ...]
    server: tuple[type[BaseModel], ...]
    client_binary: str | None = None
    server_binary: str | None = None

    def models(self) -> tuple[type[BaseModel], ...]:
        return (*((self.first,) if self.first is not None else ()), *self.client, *self.server)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A route and what its request and answers look like.

    ``body`` is a model for JSON bodies, or a media type for raw ones; ``response``
    likewise (``text/event-stream``, ``application/octet-stream``...). ``scope`` and
    ``rate`` default by method (see ``method_scope`` and ``method_rate``); an endpoint
    that is not ``authenticated`` needs no scope and is never rate-limited.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | str | None = None
    response: type[BaseModel] | str | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = ()
    authenticated: bool = True
    websocket: bool = False
    frames: WsFrames | None = None  # a WebSocket's frames, when ``response`` is not all
    scope: Scope | None = None
    rate: RateClass | None = None

    @property
    def required_scope(self) -> Scope | None:
        if not self.authenticated:
            return None
        return self.scope or method_scope(self.method)

    @property
    def rate_class(self) -> RateClass | None:
        if not self.authenticated:
            return None
        return self.rate or method_rate(self.method)


# Each routed request's Endpoint, found from aiohttp's matched route.
ROUTES = web.AppKey[dict[web.AbstractRoute, Endpoint]]("rexecd.routes")


def add_endpoints(app: web.Application, endpoints: tuple[Endpoint, ...]) -> None:
    """Route ``endpoints`` and remember which route is which ``Endpoint``."""
    routes = app.setdefault(ROUTES, {})
    for ep in endpoints:
        routes[app.router.add_route(ep.method, ep.path, ep.handler)] = ep


def matched_endpoint(request: web.Request) -> Endpoint | None:
    """The ``Endpoint`` the router matched; None for an unknown route or method, and
    for a plain route added without one."""
    routes = request.app.get(ROUTES)
    route = request.match_info.route
    return None if routes is None else routes.get(route)


def request_scope(request: web.Request) -> Scope | None:
    """The scope a request needs: its endpoint's, else by its method."""
    ep = matched_endpoint(request)
    return ep.required_scope if ep is not None else method_scope(request.method)


def request_rate(request: web.Request) -> RateClass | None:
    """The rate class a request counts in: its endpoint's, else by its method."""
    ep = matched_endpoint(request)
    return ep.rate_class if ep is not None else method_rate(request.method)
