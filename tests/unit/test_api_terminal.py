"""``GET /ws/terminal/{id}`` against the fake service: auth and scope from its Endpoint,
errors before the upgrade through the one renderer, the frames of API.md after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSServerHandshakeError

from rexecd.errors import RuntimeFailure
from tests.unit.fakes.service import Harness, harness

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}


def _protocols(h: Harness, who: str = "alice") -> tuple[str, str]:
    return ("rexec.v1", f"rexec.token.{h.tokens[who]}")


async def _frames_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] != kind:
        frames.append(json.loads((await ws.receive(timeout=10)).data))
    return frames


async def test_a_session_opens_types_resizes_and_is_resumed(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        async with h.client.ws_connect("/ws/terminal/box", protocols=_protocols(h)) as ws:
            assert ws.protocol == "rexec.v1"
            frames = await _frames_until(ws, "shell_ready")
            assert [f["type"] for f in frames] == ["connected", "shell_starting", "shell_ready"]
            assert frames[0]["data"] == rec.id and frames[2]["data"] == "new"
            await ws.send_json({"type": "input", "data": "ls\r"})
            assert (await _frames_until(ws, "output"))[-1]["data"] == "ls\r"
            await ws.send_json({"type": "resize", "cols": 120, "rows": 40})
            # Wrong JSON types name a command, so they are neither typed nor fatal.
            await ws.send_json({"type": "resize", "cols": "x", "rows": 40})
            await ws.send_str("not json")  # keystrokes, as they are
            await ws.send_json({"type": "ping"})
            await _frames_until(ws, "pong")
            session = h.service.terminals[(rec.db_id, "default")]
            assert session.written == [b"ls\r", b"not json"]
            assert session.sizes == [(120, 40)]
        await session.detached.wait()
        session.scrollback = b"earlier output"
        async with h.client.ws_connect("/ws/terminal/box?id=default", headers=h.headers()) as ws:
            frames = await _frames_until(ws, "output")
            assert frames[2] == {"type": "shell_ready", "data": "resumed"}
            assert frames[3] == {"type": "output", "data": "earlier output"}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, (404, {"error": "container not found", "code": "container_not_found"})),
        (
            "stopped",
            (
                400,
                {
                    "error": "container is not running",
                    "code": "container_stopped",
                    "status": "stopped",
                },
            ),
        ),
    ],
)
async def test_errors_before_the_upgrade_are_rendered_answers(
    tmp_path: Path, status: str | None, expected: tuple[int, dict[str, Any]]
) -> None:
    async with harness(tmp_path) as h:
        if status is not None:
            h.service.add(h.user_id(), "box", status="stopped")
        # Another user's container is not found either.
        h.service.add(h.user_id("bob"), "bobs")
        for path in ("/ws/terminal/box", "/ws/terminal/bobs"):
            if status is not None and path.endswith("bobs"):
                continue
            resp = await h.client.get(path, headers={**h.headers(), **UPGRADE})
            assert (resp.status, await resp.json()) == expected
            assert resp.headers["Content-Type"].startswith("application/json")
            assert "X-RateLimit-Limit" in resp.headers


async def test_the_route_needs_a_write_token(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.service.add(h.user_id(), "box")
        with pytest.raises(WSServerHandshakeError) as info:
            await h.client.ws_connect("/ws/terminal/box")
        assert info.value.status == 401
        resp = await h.client.get("/ws/terminal/box", headers={**h.headers("alice-ro"), **UPGRADE})
        assert resp.status == 403
        body = await resp.json()
        assert body["code"] == "forbidden" and body["required_scope"] == "write"
        assert h.service.terminals == {}


async def test_a_shell_that_cannot_start_is_an_error_frame(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.service.add(h.user_id(), "box")
        h.service.terminal_error = RuntimeFailure("terminal", "no shell (zsh, bash or sh)")
        async with h.client.ws_connect("/ws/terminal/box", headers=h.headers()) as ws:
            frames = await _frames_until(ws, "error")
            assert frames[-1]["data"] == "terminal: no shell (zsh, bash or sh)"
            assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE


async def test_the_terminal_is_in_the_openapi_document(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        doc = await (await h.client.get("/api/openapi.json", headers=h.headers())).json()
        op = doc["paths"]["/ws/terminal/{id}"]["get"]
        assert set(op["responses"]) >= {"101", "400", "401", "403", "404", "429"}
        assert "x-websocket-frames" in op["responses"]["101"]
        assert {(p["name"], p["in"]) for p in op["parameters"]} == {
            ("id", "path"),
            ("id", "query"),
            ("newSession", "query"),
        }
