"""``GET /api/containers/events`` (WebSocket) on a real daemon: the list frame, the
events of a container's life in order, ping/pong, the auth variants, per-user streams."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    cleaning,
    db_rows,
    leftovers,
    running_daemon,
    unique,
)

EVENTS = "/api/containers/events"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


async def next_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float = 15) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    frame: dict[str, Any] = msg.json()
    return frame


async def frames_until(
    ws: aiohttp.ClientWebSocketResponse, done: Any, timeout: float = 20
) -> list[dict[str, Any]]:
    """Frames until ``done(frame)`` is true (that frame included), within ``timeout``."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; frames so far: {[(f['type'], _st(f)) for f in got]}"
        frame = await next_frame(ws, left)
        got.append(frame)
        if done(frame):
            return got


async def apoll_leftovers(d: Daemon, c: dict[str, Any]) -> dict[str, Any]:
    """Leftovers of a stopped container (its IP lease is kept), once clean or at the deadline."""

    async def clean() -> bool:
        return leftovers(d, c, lease=False) == {}

    try:
        await apoll(clean, 10, what="cleanup")
    except AssertionError:
        pass
    return leftovers(d, c, lease=False)


def _st(f: dict[str, Any]) -> str | None:
    c = f.get("container")
    return None if c is None else c.get("status")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_list_then_lifecycle_events_and_pong(daemon: Daemon, transport: str) -> None:
    user_tok = daemon.token(unique("ev"))
    existing, name = unique("pre"), unique("ev")
    async with ApiClient(daemon, user_tok, transport) as c, cleaning(c) as refs:
        refs.append(existing)
        pre = await c.create_running(existing)
        ws = await c.ws(EVENTS)
        try:
            first = await next_frame(ws)
            assert first["type"] == "list"
            assert [x["id"] for x in first["containers"]] == [pre["id"]]
            assert first["containers"][0]["status"] == "running"

            await ws.send_json({"type": "ping"})
            assert (await next_frame(ws)) == {"type": "pong"}

            created = (await c.create(name)).expect(202).body
            refs.append(name)
            got = await frames_until(ws, lambda f: f["type"] == "started")
            kinds = [f["type"] for f in got]
            assert kinds[0] == "created" and kinds[-1] == "started", kinds
            assert set(kinds) <= {"created", "updated", "progress", "started"}
            for f in got:
                assert f["container"]["id"] == created["id"] and f["timestamp"].endswith("Z")
            assert got[-1]["container"]["status"] == "running"

            (await c.post(f"/api/containers/{name}/stop")).expect(200)
            got = await frames_until(ws, lambda f: f["type"] == "stopped")
            assert got[-1]["container"]["status"] == "stopped"

            (await c.post(f"/api/containers/{name}/start")).expect(200)
            got = await frames_until(ws, lambda f: f["type"] == "started")
            assert got[-1]["container"]["name"] == name

            (await c.patch(f"/api/containers/{name}/settings", {"memory_mb": 100})).expect(200)
            got = await frames_until(ws, lambda f: f["type"] == "updated")
            assert got[-1]["container"]["resources"]["memory_mb"] == 100

            (await c.delete(f"/api/containers/{name}")).expect(200)
            got = await frames_until(ws, lambda f: f["type"] == "deleted")
            kinds = [f["type"] for f in got]
            assert kinds in (["stopped", "deleted"], ["deleted"]), kinds
            assert got[-1]["container"]["id"] == created["id"]

            await ws.send_str('{"type": "ping"}')
            assert (await next_frame(ws))["type"] == "pong"
        finally:
            await ws.close()


async def test_init_exit_is_reported_as_stopped(daemon: Daemon) -> None:
    """A container whose init dies turns stopped, with an event, and leaves nothing."""
    name = unique("die")
    async with ApiClient(daemon, daemon.token(unique("die"))) as c, cleaning(c) as refs:
        refs.append(name)
        await c.create_running(name)
        ws = await c.ws(EVENTS)
        try:
            assert (await next_frame(ws))["type"] == "list"
            # From the host: a pid namespace's init ignores SIGKILL sent from inside.
            (pid,) = db_rows(daemon, "SELECT pid FROM containers WHERE name = ?", name)[0]
            os.kill(pid, signal.SIGKILL)
            got = await frames_until(ws, lambda f: f["type"] == "stopped")
            assert got[-1]["container"]["name"] == name
        finally:
            await ws.close()
        c0 = await c.container(name)
        assert c0["status"] == "stopped"
        assert await apoll_leftovers(daemon, c0) == {}
        (await c.post(f"/api/containers/{name}/start")).expect(200)
        assert await c.sh(name, "echo alive") == "alive\n"


async def test_events_are_per_user(daemon: Daemon) -> None:
    a_tok, b_tok = daemon.token(unique("ea")), daemon.token(unique("eb"))
    a_name, b_name = unique("a"), unique("b")
    async with (
        ApiClient(daemon, a_tok) as a,
        ApiClient(daemon, b_tok) as b,
        cleaning(a) as refs_a,
        cleaning(b) as refs_b,
    ):
        ws = await a.ws(EVENTS)
        try:
            assert (await next_frame(ws)) == {"type": "list", "containers": []}
            refs_b.append(b_name)
            await b.create_running(b_name)
            refs_a.append(a_name)
            await a.create_running(a_name)
            got = await frames_until(ws, lambda f: f["type"] == "started")
            assert {f["container"]["name"] for f in got} == {a_name}
        finally:
            await ws.close()


async def test_websocket_auth_variants(daemon: Daemon) -> None:
    tok = daemon.token(unique("wsa"))
    async with ApiClient(daemon, tok) as c:
        # Subprotocol token: rexec.v1 is echoed.
        ws = await c.ws(EVENTS, protocols=("rexec.v1", f"rexec.token.{tok}"))
        try:
            assert ws.protocol == "rexec.v1"
            assert (await next_frame(ws))["type"] == "list"
        finally:
            await ws.close()
        # Legacy ?token=: off unless the config switches it on (test_tenant_isolation).
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await c.ws(f"{EVENTS}?token={tok}", headers={})
        assert refused.value.status == 401
        # No token, or a bad one: refused before the upgrade.
        for kw in ({"headers": {}}, {"headers": {"Authorization": "Bearer rexec_" + "0" * 48}}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await c.ws(EVENTS, **kw)
            assert exc.value.status == 401
