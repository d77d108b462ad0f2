"""Per-user rate limiting of requests, the X-RateLimit headers on every answer, and the
per-user cap on requests in flight that exec and file routes carry."""

from __future__ import annotations

import functools

from aiohttp import web
from aiohttp.typedefs import Handler

from rexecd.api.auth import principal
from rexecd.api.endpoint import request_rate
from rexecd.api.keys import IN_FLIGHT, LIMITER, PRINCIPAL, RATE_DECISION, lookup
from rexecd.errors import RateLimited
from rexecd.service.inflight import InFlightKind
from rexecd.service.ratelimit import RateDecision

MSG_RATE_LIMITED = "rate limit exceeded"


def _decide(request: web.Request, *, consume: bool) -> RateDecision | None:
    """The limiter's answer for this request's caller and route; None when the request
    is not limited at all (no caller yet, a public route, an exempt scope)."""
    p = lookup(request, PRINCIPAL)
    cls = request_rate(request)
    limiter = request.app[LIMITER]
    if p is None or cls is None or limiter.exempt(p.scopes):
        return None
    decide = limiter.check if consume else limiter.peek
    return decide(p.user_id, cls, p.tier, p.scopes)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts the request in its route's rate class: 429 when the window is full."""
    decision = _decide(request, consume=True)
    if decision is not None:
        request[RATE_DECISION] = decision
        if not decision.allowed:
            raise RateLimited(MSG_RATE_LIMITED, retry_after=decision.retry_after_header)
    return await handler(request)


async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs for every response, streamed and error ones
    included, just before its headers leave, whichever layer produced it."""
    decision = lookup(request, RATE_DECISION)
    if decision is None:
        # Refused before the limiter counted it (a missing scope): report the
        # window as it stands, without charging the request.
        decision = _decide(request, consume=False)
        if decision is None:
            return
    response.headers["X-RateLimit-Limit"] = str(decision.limit)
    response.headers["X-RateLimit-Remaining"] = str(decision.remaining)
    if response.status == 429 and not decision.allowed:
        response.headers["Retry-After"] = str(decision.retry_after_header)


def in_flight(kind: InFlightKind, handler: Handler) -> Handler:
    """``handler`` holding one of the caller's ``kind`` slots until it returns (a
    streamed download until its last byte); 429 when the caller has none left."""

    @functools.wraps(handler)
    async def limited(request: web.Request) -> web.StreamResponse:
        with request.app[IN_FLIGHT].hold(principal(request).user_id, kind):
            return await handler(request)

    return limited
