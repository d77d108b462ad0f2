"""Who is asking: the authentication and scope middlewares and the request principal helpers."""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from rexecd.api.credentials import (
    WS_PROTOCOL,
    WS_TOKEN_PROTOCOL_PREFIX,
    WsCredentials,
    bearer_token,
    extract_ws_token,
)
from rexecd.api.endpoint import request_scope
from rexecd.api.keys import CONFIG, PRINCIPAL, STORE, lookup
from rexecd.errors import Unauthorized
from rexecd.service import auth
from rexecd.service.auth import Principal
from rexecd.service.storethread import in_store_thread

# Offer these to ``web.WebSocketResponse(protocols=...)``: browsers drop a socket whose
# offered subprotocol gets no answer, and Rexec clients offer ``rexec.v1``.
WS_PROTOCOLS: tuple[str, ...] = (WS_PROTOCOL,)


_TOKEN_PROTOCOL_RE = re.compile(re.escape(WS_TOKEN_PROTOCOL_PREFIX) + r"[^\s,'\"\]]+")
_REDACTED = WS_TOKEN_PROTOCOL_PREFIX + "<redacted>"


def _redact(value: object) -> object:
    if isinstance(value, str):
        return _TOKEN_PROTOCOL_RE.sub(_REDACTED, value)
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return value


class _RedactTokenProtocols(logging.Filter):
    """aiohttp logs the offered subprotocols when none is accepted (a client sending
    ``rexec.token.<tok>`` without ``rexec.v1``): the token must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) for a in record.args)
        return True


def redact_ws_token_logs() -> None:
    """Install the redaction on aiohttp's WebSocket logger, once per process."""
    logger = logging.getLogger("aiohttp.websocket")
    if not any(isinstance(f, _RedactTokenProtocols) for f in logger.filters):
        logger.addFilter(_RedactTokenProtocols())


def is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").strip().lower() == "websocket"


def _ws_credentials(request: web.Request) -> WsCredentials:
    allow_query = request.app[CONFIG].auth.ws_query_token
    return extract_ws_token(request.headers, request.query, allow_query=allow_query)


def request_token(request: web.Request) -> str | None:
    """The token a request carries; WebSocket upgrades may also use the subprotocol or,
    where the config allows it, ``?token=``: a browser cannot set headers on an upgrade."""
    if is_websocket_upgrade(request):
        return _ws_credentials(request).token
    # A token in a plain request's URL would end up in logs and histories.
    return bearer_token(request.headers.get("Authorization"))


async def _authenticate(request: web.Request, token: str | None) -> Principal:
    # The store is SQLite (a concurrent CLI writer can make a lookup wait): off the
    # loop, on the store's own thread, where no tenant's work can delay it.
    return await in_store_thread(auth.authenticate, request.app[STORE], token)


def principal(request: web.Request) -> Principal:
    """The authenticated caller of a request that went through ``auth_middleware``."""
    found = lookup(request, PRINCIPAL)
    if found is None:
        raise Unauthorized(auth.MSG_TOKEN_REQUIRED)
    return found


async def principal_from_ws_request(request: web.Request) -> Principal:
    """The caller of a WebSocket upgrade, with the scope its route needs checked.

    The middlewares have normally done this already (every ``Endpoint`` included);
    the check is repeated here only when they have not, so a handler can rely on it.
    """
    found = lookup(request, PRINCIPAL)
    if found is None:
        found = await _authenticate(request, _ws_credentials(request).token)
        request[PRINCIPAL] = found
    scope = request_scope(request)
    if scope is not None:
        auth.require(found, scope)
    return found


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticates every request whose route needs a scope (and every unknown route:
    a stranger learns nothing, not even which paths exist)."""
    if request_scope(request) is not None:
        request[PRINCIPAL] = await _authenticate(request, request_token(request))
    return await handler(request)


@web.middleware
async def scope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuses (403) a token without the scope the matched route declares."""
    scope = request_scope(request)
    if scope is not None:
        auth.require(principal(request), scope)
    return await handler(request)
