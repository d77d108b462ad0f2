"""The connection guard on its own: an aiohttp app on a loopback socket whose requests
authenticate with a header, and raw clients that are silent, anonymous or bursty."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from rexecd.api.guard import BURST_FACTOR, GRACE_S, ConnectionGuard, GuardedSite, GuardLimits
from rexecd.api.keys import PRINCIPAL
from rexecd.service.auth import Principal

CAP = 2
ALICE = Principal("u", "alice", "free", frozenset({"read"}), "t")


@web.middleware
async def fake_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.headers.get("X-Auth") == "yes":
        request[PRINCIPAL] = ALICE
    return await handler(request)


async def hello(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def guarded_server(header_timeout: float = 30.0) -> AsyncIterator[int]:
    app = web.Application(middlewares=[fake_auth])
    app.router.add_get("/", hello)
    guard = ConnectionGuard(GuardLimits(header_timeout, 30.0, CAP))
    guard.install(app)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        await GuardedSite(runner, sock, guard).start()
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()
        sock.close()


async def status_of_new_connection(port: int, auth: bool = False) -> int:
    """The status a fresh connection gets for ``GET /`` (429 without sending, if refused)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "X-Auth: yes\r\n" if auth else ""
        writer.write(f"GET / HTTP/1.1\r\nHost: t\r\n{head}Connection: close\r\n\r\n".encode())
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except ConnectionResetError:
            return 0
        return int(line.split()[1]) if line else 0
    finally:
        writer.close()


async def test_silent_connections_count_after_the_grace() -> None:
    async with guarded_server() as port:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
        try:
            # Fresh, they do not count yet: a client's parallel connections are not
            # refused before it had a chance to send anything.
            assert await status_of_new_connection(port) == 200
            await asyncio.sleep(GRACE_S + 0.2)
            assert await status_of_new_connection(port) == 429
        finally:
            for _, w in silent:
                w.close()


async def test_burst_of_parallel_requests_is_served() -> None:
    async with guarded_server() as port, aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.get(f"http://127.0.0.1:{port}/", headers={"X-Auth": "yes"}) as r:
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(CAP * BURST_FACTOR)))
        assert statuses == [200] * (CAP * BURST_FACTOR)


async def test_fresh_connections_are_bounded_too() -> None:
    async with guarded_server() as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP * BURST_FACTOR)]
        try:
            assert await status_of_new_connection(port) == 429
        finally:
            for _, w in held:
                w.close()


async def test_authenticated_connections_do_not_count() -> None:
    async with guarded_server() as port:
        conns = []
        try:
            for _ in range(CAP + 2):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                conns.append(w)
                w.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Auth: yes\r\n\r\n")
                assert (await r.readline()).split()[1] == b"200"
            await asyncio.sleep(GRACE_S + 0.2)
            assert await status_of_new_connection(port) == 200
        finally:
            for w in conns:
                w.close()


async def test_header_timeout_closes_a_silent_connection() -> None:
    async with guarded_server(header_timeout=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
