"""Integration: what a low-tier tenant can make the daemon hold that no container cgroup
pays for. Terminal sessions: each one's id is the client's choice and a detached
session lives on for ``terminal.idle_timeout_s`` with a PTY master, a pidfd and up to
``terminal.scrollback_bytes`` of scrollback in the daemon; without a cap, one guest
container's pids limit (512) was the only bound (about 130 MiB of daemon memory).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from rexecd.config import Config
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    cleaning,
    running_daemon,
    unique,
)
from tests.integration.terminal_client import terminal

MAX_SESSIONS = Config().terminal.max_sessions
MAX_EVENT_STREAMS = Config().concurrency.event_streams_per_user
EVENTS = "/api/containers/events"
EXTRA = 8


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


async def open_detached(d: Daemon, token: str, ref: str, session: str) -> dict[str, object]:
    """Open session ``session`` and leave it detached: its shell_ready or error frame."""
    async with terminal(d, token, ref, wait_ready=False, id=session) as t:
        await t.until(
            lambda: any(f["type"] in ("shell_ready", "error") for f in t.frames),
            what="shell_ready or error",
        )
        return next(f for f in t.frames if f["type"] in ("shell_ready", "error"))


async def test_terminal_sessions_per_container_are_capped(daemon: Daemon) -> None:
    token = daemon.token(unique("terms"), tier="guest")
    async with ApiClient(daemon, token) as c, cleaning(c) as refs:
        name = unique("terms")
        refs.append(name)
        await c.create_running(name)
        ids = [f"s{i}" for i in range(MAX_SESSIONS + EXTRA)]
        # All at once: the shells start concurrently, and the cap must count those
        # still starting.
        frames = await asyncio.gather(*(open_detached(daemon, token, name, s) for s in ids))
        ready = [s for s, f in zip(ids, frames, strict=True) if f["type"] == "shell_ready"]
        refused = [f for f in frames if f["type"] == "error"]
        assert len(ready) == MAX_SESSIONS, frames
        assert len(refused) == EXTRA, frames
        assert all("terminal session limit" in str(f["data"]) for f in refused), refused
        # A live session is still taken over by its id, and a fresh shell in its place
        # (newSession) replaces it rather than adding one.
        again = await open_detached(daemon, token, name, ready[0])
        assert again == {"type": "shell_ready", "data": "resumed"}
        async with terminal(daemon, token, name, id=ready[1], newSession="true") as t:
            assert (await t.run("echo fresh")).strip() == "fresh"
        # Once the container's sessions end (stop), there is room again.
        (await c.post(f"/api/containers/{name}/restart")).expect(200)
        await c.wait_status(name, "running")
        frame = await open_detached(daemon, token, name, "after-restart")
        assert frame["type"] == "shell_ready", frame


@contextlib.asynccontextmanager
async def event_sockets(d: Daemon, token: str, n: int) -> AsyncIterator[list[object]]:
    """``n`` event sockets of ``token``'s user, each past its list frame."""
    url = d.url.replace("http://", "ws://") + EVENTS
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        socks: list[object] = []
        for _ in range(n):
            ws = await stack.enter_async_context(
                http.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
            )
            assert (await ws.receive_json(timeout=10))["type"] == "list"
            socks.append(ws)
        yield socks


async def test_event_sockets_per_user_are_capped(daemon: Daemon) -> None:
    alice = daemon.token(unique("events"), tier="guest")
    bob = daemon.token(unique("events"), tier="guest")
    async with ApiClient(daemon, alice) as a, ApiClient(daemon, bob) as b:
        async with event_sockets(daemon, alice, MAX_EVENT_STREAMS):
            one_more = await a.get(EVENTS, headers=_upgrade())
            assert one_more.status == 429, one_more.body
            assert one_more["code"] == "concurrency_limited", one_more.body
            # Another user's sockets are not counted against alice's.
            async with event_sockets(daemon, bob, 1):
                pass

        # Closed sockets give their slots back, once the server has seen them close.
        async def room() -> bool:
            try:
                async with event_sockets(daemon, alice, MAX_EVENT_STREAMS):
                    return True
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 429, exc
                return False

        await apoll(room, what="alice's event socket slots back")
        assert (await b.get("/api/containers")).status == 200


def _upgrade() -> dict[str, str]:
    """Headers of a WebSocket upgrade, for a request made as plain HTTP."""
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
