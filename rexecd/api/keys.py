"""Typed keys for the state the HTTP layer keeps on the application and on each request."""

from __future__ import annotations

import weakref
from typing import TypeVar

from aiohttp import web

from rexecd.config import Config
from rexecd.service.auth import Principal
from rexecd.service.inflight import InFlightLimiter
from rexecd.service.interface import ContainerService
from rexecd.service.ratelimit import RateDecision, RateLimiter
from rexecd.service.store import Store

# Explicit type arguments: a Protocol cannot be passed where ``type[T]`` is expected.
SERVICE = web.AppKey[ContainerService]("rexecd.service")
STORE = web.AppKey[Store]("rexecd.store")
CONFIG = web.AppKey[Config]("rexecd.config")
LIMITER = web.AppKey[RateLimiter]("rexecd.limiter")
IN_FLIGHT = web.AppKey[InFlightLimiter]("rexecd.in_flight")
VERSION = web.AppKey[str]("rexecd.version")
BUILD = web.AppKey[str]("rexecd.build")
# The OpenAPI document, serialised once when the app is made.
OPENAPI = web.AppKey[str]("rexecd.openapi")
# Every open WebSocket (events, terminals): closed on shutdown so clients see a clean
# close frame instead of a reset. Weak, so a finished handler needs no bookkeeping.
WEBSOCKETS = web.AppKey[weakref.WeakSet[web.WebSocketResponse]]("rexecd.websockets")

T = TypeVar("T")

PRINCIPAL = web.RequestKey[Principal]("rexecd.principal")
RATE_DECISION = web.RequestKey[RateDecision]("rexecd.rate_decision")


def lookup(request: web.Request, key: web.RequestKey[T]) -> T | None:
    """``request.get`` with the key's type kept (Request.get is typed as Any)."""
    found: T | None = request.get(key)
    return found


def track_websocket(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Have ``ws`` closed when the daemon shuts down (call after ``prepare``)."""
    request.app[WEBSOCKETS].add(ws)
