"""What a client connection must do to keep its place on a listener.

A connection that has not sent a complete request head ``header_timeout`` seconds
after connecting is closed; so is one whose request body receives no byte for
``body_timeout`` seconds while the daemon waits for it (kept-alive connections
between requests are aiohttp's ``keepalive_timeout``).

On a TCP listener each client address may hold at most ``unauthenticated_per_ip``
idle unauthenticated connections: ones that have not made an authenticated request,
have no request in progress, and have either been open for ``GRACE_S`` or already
had an anonymous request answered. Beyond that a new connection is answered 429 and
closed, so one address cannot fill the daemon with silent or half-sent requests.
Connections that authenticated are not counted and keep being served, and a burst
of parallel requests from one client is not refused for the moment its connections
are open but not yet read; ``BURST_FACTOR`` times the cap bounds even those.

aiohttp has no header or body read timeout, so each connection's protocol (aiohttp's
``RequestHandler``) is wrapped in a ``GuardedConnection`` that sees the bytes arrive,
and two hooks on the application tell it when a request head was complete (the
outermost middleware) and when a request was authenticated (response prepare).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from rexecd.api.keys import PRINCIPAL, lookup
from rexecd.errors import RateLimited

log = logging.getLogger(__name__)

MSG_TOO_MANY = "too many unauthenticated connections from this address"
# How long a new connection may stay silent before it counts against its address's cap.
GRACE_S = 1.0
# Unauthenticated connections of one address, silent or not, are never more than this
# many times the cap.
BURST_FACTOR = 4


@dataclass(frozen=True)
class GuardLimits:
    header_timeout: float
    body_timeout: float
    # 0: no cap.
    unauthenticated_per_ip: int


def _refusal() -> bytes:
    body = json.dumps(RateLimited(MSG_TOO_MANY).to_json()).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class ConnectionGuard:
    """The limits, and the unauthenticated TCP connections of each client address."""

    limits: GuardLimits
    # Open TCP connections that have not authenticated, by client address.
    _unauthenticated: dict[str, set[GuardedConnection]] = field(default_factory=dict)
    _connections: dict[web.RequestHandler, GuardedConnection] = field(default_factory=dict)

    def install(self, app: web.Application) -> None:
        """Add the guard's hooks to ``app``; call it before the runner sets the app up."""
        # Outermost, before the error middleware: it must see every request head,
        # including the ones answered 401 or 429.
        app.middlewares.insert(0, self._middleware)
        app.on_response_prepare.append(self._on_prepare)

    def protocol_factory(self, server: web.Server, tcp: bool) -> Callable[[], GuardedConnection]:
        return lambda: GuardedConnection(self, server(), counted=tcp)

    # -- bookkeeping from the connections ----------------------------------------------

    def _admit(self, conn: GuardedConnection, ip: str) -> bool:
        conns = self._unauthenticated.setdefault(ip, set())
        cap = self.limits.unauthenticated_per_ip
        if cap and len(conns) >= cap:
            if len(conns) >= cap * BURST_FACTOR:
                return False
            now = asyncio.get_running_loop().time()
            if sum(c.idle_unauthenticated(now) for c in conns) >= cap:
                return False
        conns.add(conn)
        return True

    def _release(self, conn: GuardedConnection, ip: str) -> None:
        conns = self._unauthenticated.get(ip)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._unauthenticated[ip]

    # -- application hooks --------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self._connections.get(request.protocol)
        if conn is None:
            return await handler(request)
        conn.request_started(request)
        try:
            return await handler(request)
        finally:
            conn.request_ended(request)

    async def _on_prepare(self, request: web.Request, _response: web.StreamResponse) -> None:
        # At prepare, not when the handler returns: a WebSocket or an event stream
        # stays in its handler for as long as it is open.
        if lookup(request, PRINCIPAL) is not None:
            conn = self._connections.get(request.protocol)
            if conn is not None:
                conn.authenticated()


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard's deadlines around it.

    Every event is passed on to ``inner``; aiohttp itself never looks at the
    transport's protocol, so it does not see the wrapper.
    """

    def __init__(self, guard: ConnectionGuard, inner: web.RequestHandler, counted: bool) -> None:
        self.guard = guard
        self.inner = inner
        self._counted = counted
        self._ip: str | None = None
        self._transport: asyncio.Transport | None = None
        self._refused = False
        self._loop = asyncio.get_running_loop()
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._request: web.BaseRequest | None = None
        self._served = 0
        self._opened = self._last_data = self._loop.time()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._counted:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else None
            if ip is not None and not self.guard._admit(self, ip):
                self._refused = True
                log.debug("refused a connection from %s: unauthenticated cap reached", ip)
                transport.write(_refusal())
                transport.close()
                return
            self._ip = ip
        self.guard._connections[self.inner] = self
        self._head_timer = self._loop.call_later(
            self.guard.limits.header_timeout, self._close, "no complete request head"
        )
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        if not self._refused:
            self.inner.data_received(data)

    def eof_received(self) -> None:
        if not self._refused:
            self.inner.eof_received()

    def pause_writing(self) -> None:
        if not self._refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_timers()
        self.authenticated()  # no longer counted either way
        self.guard._connections.pop(self.inner, None)
        self.inner.connection_lost(exc)

    # -- from the application hooks -------------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._request = request
        if not request.content.is_eof():
            self._last_data = self._loop.time()
            self._arm_body(self.guard.limits.body_timeout)

    def request_ended(self, request: web.BaseRequest) -> None:
        self._served += 1
        if self._request is request:
            self._request = None
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

    def authenticated(self) -> None:
        if self._ip is not None:
            self.guard._release(self, self._ip)
            self._ip = None

    def idle_unauthenticated(self, now: float) -> bool:
        """Whether this (unauthenticated) connection counts against its address's cap."""
        if self._request is not None:
            return False
        return self._served > 0 or now - self._opened >= GRACE_S

    # -- deadlines ------------------------------------------------------------------------

    def _arm_body(self, delay: float) -> None:
        self._body_timer = self._loop.call_later(delay, self._check_body)

    def _check_body(self) -> None:
        self._body_timer = None
        request = self._request
        if request is None or request.content.is_eof() or self._transport is None:
            return
        now = self._loop.time()
        if not self._transport.is_reading():
            # aiohttp stopped reading because the handler has not consumed what came:
            # the wait is the daemon's, not the client's.
            self._last_data = now
        idle = now - self._last_data
        limit = self.guard.limits.body_timeout
        if idle >= limit:
            self._close("request body stalled")
            return
        self._arm_body(limit - idle)

    def _close(self, why: str) -> None:
        self._head_timer = None
        peer = self._transport.get_extra_info("peername") if self._transport else None
        log.debug("closing the connection of %s: %s", peer or "a local client", why)
        self.inner.force_close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


class GuardedSite(web.SockSite):
    """A ``SockSite`` on an already bound socket whose connections go through ``guard``;
    connections to a TCP socket count against the per-address cap."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._guard = guard
        self._listen_sock = sock

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        tcp = self._listen_sock.family in (socket.AF_INET, socket.AF_INET6)
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server, tcp),
            sock=self._listen_sock,
            backlog=self._backlog,
            ssl=self._ssl_context,
        )
