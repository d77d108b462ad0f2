"""Container, exec, stream (SSE) and events (WebSocket) endpoints against the fake service."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rexecd.errors import RuntimeFailure
from rexecd.models import Event
from tests.deadlines import scaled
from tests.unit.fakes.service import harness


async def test_list_and_get(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "one")
        h.service.add(h.user_id("bob"), "bobs")
        resp = await h.client.get("/api/containers", headers=h.headers())
        assert resp.status == 200
        body = await resp.json()
        assert body["count"] == 1 and body["limit"] == 5
        c = body["containers"][0]
        assert c["id"] == rec.id and c["db_id"] == rec.db_id and c["name"] == "one"
        assert c["created_at"] == "2024-05-01T12:00:00Z"
        assert c["resources"] == {
            "memory_mb": 512,
            "cpu_shares": 500,
            "disk_mb": 2048,
            "network_mbps": 100,
        }
        # Optional keys are left out, not sent as null.
        assert "async" not in c and "error_message" not in c
        got = await (await h.client.get(f"/api/containers/{rec.id}", headers=h.headers())).json()
        assert got == c


async def test_create_is_async_202(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.post(
            "/api/containers", json={"image": "ubuntu", "name": "web"}, headers=h.headers()
        )
        assert resp.status == 202
        body = await resp.json()
        assert body["async"] is True and body["status"] == "creating" and body["name"] == "web"
        resp = await h.client.post(
            "/api/containers", json={"image": "ubuntu", "name": "web"}, headers=h.headers()
        )
        assert resp.status == 409
        assert await resp.json() == {
            "error": "container with this name already exists",
            "code": "conflict",
            "name": "web",
        }
        resp = await h.client.post(
            "/api/containers", json={"image": "windows"}, headers=h.headers()
        )
        assert resp.status == 400
        body = await resp.json()
        assert body["error"] == "unsupported image type"
        assert body["supported_images"] == ["ubuntu", "alpine"]


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({}, ["image"]),
        ({"image": "ubuntu", "name": "-bad"}, ["name"]),
        ({"image": "ubuntu", "memory_mb": -1}, ["memory_mb"]),
        ({"image": "ubuntu", "surprise": 1}, ["surprise"]),
        ([1, 2], []),
    ],
)
async def test_invalid_create_body(tmp_path: Path, payload: Any, loc: list[str]) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.post("/api/containers", json=payload, headers=h.headers())
        assert resp.status == 400
        body = await resp.json()
        assert body["error"] == "invalid request body"
        assert body["details"][0]["loc"] == loc
        assert "msg" in body["details"][0] and "input" not in body["details"][0]


async def test_invalid_json_body(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.post(
            "/api/containers",
            data=b"{not json",
            headers={**h.headers(), "Content-Type": "application/json"},
        )
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid JSON body"


async def test_lifecycle_actions(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box", status="stopped")
        base = f"/api/containers/{rec.name}"
        resp = await h.client.post(f"{base}/start", headers=h.headers())
        assert resp.status == 200
        assert await resp.json() == {
            "message": "container started",
            "id": rec.id,
            "name": "box",
            "status": "running",
        }
        resp = await h.client.post(f"{base}/start", headers=h.headers())
        assert resp.status == 409
        resp = await h.client.post(f"{base}/stop", headers=h.headers())
        assert (await resp.json())["status"] == "stopped"
        resp = await h.client.post(f"{base}/stop?timeout=2.5", headers=h.headers())
        assert resp.status == 200
        resp = await h.client.post(f"{base}/stop?timeout=99999", headers=h.headers())
        assert resp.status == 200
        # Default from the config, explicit value, clamped value.
        assert h.service.stop_timeouts == [7.0, 2.5, 300.0]
        for bad in ("-1", "soon", "nan", "inf"):
            resp = await h.client.post(f"{base}/stop?timeout={bad}", headers=h.headers())
            assert resp.status == 400
        resp = await h.client.post(f"{base}/restart", headers=h.headers())
        assert await resp.json() == {
            "message": "container restarted",
            "id": rec.id,
            "name": "box",
            "status": "running",
        }


async def test_delete(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        one = h.service.add(h.user_id(), "one")
        two = h.service.add(h.user_id(), "two")
        resp = await h.client.delete(f"/api/containers/{one.db_id}", headers=h.headers())
        assert await resp.json() == {
            "message": "container deleted",
            "id": one.id,
            "db_id": one.db_id,
            "name": "one",
        }
        resp = await h.client.delete(f"/api/containers/{two.id}?volumes=true", headers=h.headers())
        assert resp.status == 200
        assert h.service.deleted_volumes == [False, True]
        resp = await h.client.delete(f"/api/containers/{two.id}", headers=h.headers())
        assert resp.status == 404
        three = h.service.add(h.user_id(), "three")
        resp = await h.client.delete(
            f"/api/containers/{three.id}?volumes=maybe", headers=h.headers()
        )
        assert resp.status == 400


async def test_settings(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        resp = await h.client.patch(
            f"/api/containers/{rec.id}/settings",
            json={"name": "renamed", "disk_mb": 4096},
            headers=h.headers(),
        )
        assert resp.status == 200
        body = await resp.json()
        assert body["message"] == "settings updated" and body["restarted"] is True
        assert body["container"]["name"] == "renamed"
        assert body["container"]["resources"]["disk_mb"] == 4096
        resp = await h.client.patch(
            f"/api/containers/{rec.id}/settings", json={"cpu_shares": "lots"}, headers=h.headers()
        )
        assert resp.status == 400
        assert (await resp.json())["details"][0]["loc"] == ["cpu_shares"]


async def test_exec(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        url = f"/api/containers/{rec.id}/exec"
        resp = await h.client.post(url, json={"command": "echo hi"}, headers=h.headers())
        assert resp.status == 200
        assert (await resp.json())["stdout"] == "hi\n"
        h.service.exec_answer = (504, {"stdout": "part", "exit_code": -1, "truncated": False})
        resp = await h.client.post(url, json={"cmd": ["sleep", "9"]}, headers=h.headers())
        assert resp.status == 504
        assert (await resp.json())["stdout"] == "part"
        resp = await h.client.post(url, json={"command": "a", "cmd": ["b"]}, headers=h.headers())
        assert resp.status == 400
        stopped = h.service.add(h.user_id(), "off", status="stopped")
        resp = await h.client.post(
            f"/api/containers/{stopped.id}/exec", json={"command": "true"}, headers=h.headers()
        )
        assert resp.status == 409


async def test_stats(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        resp = await h.client.get(f"/api/containers/{rec.id}/stats", headers=h.headers())
        body = await resp.json()
        assert set(body) == {
            "cpu_percent",
            "cpu_usage_usec",
            "memory",
            "memory_limit",
            "pids",
            "disk_read",
            "disk_write",
            "disk_usage",
            "disk_limit",
            "net_rx",
            "net_tx",
            "oom_kills",
        }


async def test_internal_errors_hide_the_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with harness(tmp_path) as h:
        h.service.boom = ZeroDivisionError("secret /var/lib/rexecd detail")
        with caplog.at_level(logging.ERROR, logger="rexecd.api"):
            resp = await h.client.get("/api/containers", headers=h.headers())
        assert resp.status == 500
        text = await resp.text()
        assert json.loads(text) == {"error": "internal server error", "code": "internal_error"}
        assert "secret" not in text and "Traceback" not in text
        assert "ZeroDivisionError" in caplog.text
        # A RexecError knows its own status and message.
        h.service.boom = RuntimeFailure("mount overlay", "No such device", 19)
        resp = await h.client.get("/api/containers", headers=h.headers())
        assert resp.status == 500
        assert (await resp.json())["code"] == "runtime_failure"


def _frames(text: str) -> list[dict[str, Any]]:
    frames = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: ")
            frames.append(json.loads(block[len("data: ") :]))
    return frames


async def test_stream_create(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.post(
            "/api/containers/stream", json={"image": "ubuntu", "name": "s"}, headers=h.headers()
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "X-RateLimit-Limit" in resp.headers
        frames = _frames(await resp.text())
        assert [f["stage"] for f in frames] == ["validating", "creating", "ready"]
        last = frames[-1]
        assert last["complete"] is True and last["progress"] == 100
        assert last["container"]["status"] == "running"
        assert last["container_id"] == last["container"]["id"]
        assert all("error" not in f for f in frames)


async def test_stream_errors(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # Refused before any frame: a plain JSON error with its status.
        resp = await h.client.post(
            "/api/containers/stream", json={"image": "windows"}, headers=h.headers()
        )
        assert resp.status == 400
        assert (await resp.json())["error"] == "unsupported image type"
        resp = await h.client.post("/api/containers/stream", json={}, headers=h.headers())
        assert resp.status == 400
        # Failing in the background: the last frame carries the error.
        resp = await h.client.post(
            "/api/containers/stream", json={"image": "broken"}, headers=h.headers()
        )
        assert resp.status == 200
        frames = _frames(await resp.text())
        assert frames[-1]["error"] == "image is broken"
        assert frames[-1]["container"]["status"] == "error"
        assert frames[-1]["complete"] is False


async def test_events_websocket(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        async with h.client.ws_connect("/api/containers/events", headers=h.headers()) as ws:
            first = await ws.receive_json()
            assert first["type"] == "list"
            assert [c["id"] for c in first["containers"]] == [rec.id]
            await ws.send_json({"type": "ping"})
            assert await ws.receive_json() == {"type": "pong"}
            await ws.send_str("not json")
            event = Event(type="stopped", container=rec.to_out(), timestamp=rec.created_at)
            await h.service.publish(h.user_id(), event)
            got = await ws.receive_json(timeout=scaled(5))
            assert got["type"] == "stopped" and got["container"]["id"] == rec.id
            assert got["timestamp"] == "2024-05-01T12:00:00Z"
        # The subscription is closed when the client leaves.
        for _ in range(50):
            if h.service.subscriptions[0].closed:
                break
            await asyncio.sleep(0.01)
        assert h.service.subscriptions[0].closed


async def test_events_closed_on_shutdown(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        ws = await h.client.ws_connect("/api/containers/events", headers=h.headers())
        assert (await ws.receive_json())["type"] == "list"
        await h.client.app.shutdown()
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert ws.closed or msg.type.name in ("CLOSE", "CLOSING", "CLOSED")
        assert ws.close_code == 1001
        await ws.close()


async def test_container_named_events_still_readable(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "events")
        resp = await h.client.get("/api/containers/events", headers=h.headers())
        assert resp.status == 200
        assert (await resp.json())["id"] == rec.id


async def test_events_between_subscribe_and_list_are_kept(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        h.service.generator_subscriptions = True

        async def change_while_listing() -> None:
            await h.service.publish(h.user_id(), Event(type="updated", container=rec.to_out()))

        h.service.on_list = change_while_listing
        async with h.client.ws_connect("/api/containers/events", headers=h.headers()) as ws:
            assert (await ws.receive_json(timeout=scaled(5)))["type"] == "list"
            assert (await ws.receive_json(timeout=scaled(5)))["type"] == "updated"
        for _ in range(50):
            if not h.service.subscribers[h.user_id()]:
                break
            await asyncio.sleep(0.01)
        assert h.service.subscribers[h.user_id()] == []
