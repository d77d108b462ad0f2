"""Hostile input against a real daemon: JSON bodies and multipart forms the parsers
refuse are a 400 with a code and change nothing; terminal and events WebSockets
survive any frame, and a terminal frame that is not a command reaches the shell byte
for byte."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, running_daemon
from tests.integration.terminal_client import Term, terminal

DEEP = "[" * 1500 + "]" * 1500
HOSTILE_BODIES = {
    "deep": DEEP,
    "huge_int": '{"image": "busybox", "memory_mb": 1' + "0" * 5000 + "}",
    "lone_surrogate": '{"image": "busybox", "name": "\\ud800"}',
    "nan": '{"image": "busybox", "memory_mb": NaN}',
}


@dataclass
class Env:
    d: Daemon
    token: str
    box: dict[str, object]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with running_daemon(tmp_path_factory) as d:
        token = d.token("hostile", tier="pro")

        async def make() -> dict[str, object]:
            async with ApiClient(d, token) as c:
                return await c.create_running("box")

        yield Env(d, token, asyncio.run(make()))


async def _raw(
    c: ApiClient, method: str, path: str, data: bytes, content_type: str
) -> tuple[int, dict[str, object]]:
    r = await c.request(method, path, data=data, headers={"Content-Type": content_type})
    assert r.headers.get("Content-Type", "").startswith("application/json"), (r.status, r.raw)
    return r.status, r.body


# ------------------------------------------------------------------ HTTP bodies


async def test_hostile_json_is_400_and_changes_nothing(env: Env) -> None:
    async with ApiClient(env.d, env.token) as c:
        before = (await c.get("/api/containers")).expect(200)["containers"]
        box = await c.container("box")
        requests = [
            ("POST", "/api/containers"),
            ("POST", "/api/containers/stream"),
            ("PATCH", "/api/containers/box/settings"),
            ("POST", "/api/containers/box/exec"),
            ("POST", "/api/tokens"),
        ]
        for method, path in requests:
            for name, text in HOSTILE_BODIES.items():
                status, body = await _raw(c, method, path, text.encode(), "application/json")
                assert status == 400, (name, path, body)
                assert body["code"] == "invalid_json" and body["error"], (name, path, body)
        assert (await c.get("/api/containers")).expect(200)["containers"] == before
        assert await c.container("box") == box
    assert "unhandled error" not in env.d.logs()


MULTIPART = "multipart/form-data; boundary=b"
HOSTILE_FORMS = {
    "bad_header": b'--b\r\nContent-Disposition: form-data; name="file"; filename="h1"\r\n'
    b"Bad Header\r\n\r\nhello\r\n--b--\r\n",
    "nul_in_name": b'--b\r\nContent-Disposition: form-data; name="fi\x00le"; filename="h2"\r\n'
    b"\r\nhello\r\n--b--\r\n",
    "no_boundary_found": b"hello",
    "truncated": b'--b\r\nContent-Disposition: form-data; name="file"; filename="h3"\r\n\r\nhel',
}


async def test_malformed_multipart_upload_is_400_and_writes_nothing(env: Env) -> None:
    async with ApiClient(env.d, env.token) as c:
        for name, raw in HOSTILE_FORMS.items():
            status, body = await _raw(
                c, "POST", "/api/containers/box/files?path=/tmp", raw, MULTIPART
            )
            assert status == 400, (name, body)
            assert body["code"] == "invalid_multipart" and body["error"], (name, body)
        listing = (await c.get("/api/containers/box/files/list?path=/tmp")).expect(200)
        assert not {f["name"] for f in listing["files"]} & {"h1", "h2", "h3"}, listing.body
        # A well-formed upload on the same socket still works.
        form = aiohttp.FormData()
        form.add_field("file", b"fine", filename="ok.txt")
        (await c.post("/api/containers/box/files?path=/tmp", data=form)).expect(200)
    assert "unhandled error" not in env.d.logs()


# ------------------------------------------------------------------ terminal frames


async def _typed_raw(t: Term, frames: list[str | bytes]) -> None:
    """Send ``frames`` while the shell copies its raw input to a file; the file must
    then hold exactly the frames' bytes (checked by md5 in the container)."""
    expected = b"".join(f.encode() if isinstance(f, str) else f for f in frames)
    tok = secrets.token_hex(4)
    # Raw mode: no line length limit, no echo, no CR translation; bytes arrive as sent.
    await t.send(
        f"stty raw -echo; echo R''{tok}; head -c {len(expected)} > /tmp/frames; "
        f"stty sane; echo D''{tok}\r"
    )
    await t.expect(f"R{tok}\n")
    for frame in frames:
        if isinstance(frame, bytes):
            await t.ws.send_bytes(frame)
        else:
            await t.ws.send_str(frame)
    await t.expect(f"D{tok}\r\n", timeout=60)
    digest = (await t.run("md5sum < /tmp/frames")).split()[0]
    assert digest == hashlib.md5(expected).hexdigest()


async def test_terminal_frames_that_are_not_commands_reach_the_pty_as_is(env: Env) -> None:
    async with terminal(env.d, env.token, "box", id="hostile-raw") as t:
        await t.run("true")
        frames: list[str | bytes] = [
            DEEP,  # valid JSON to a naive parser's eye, past any decoder's depth
            "[" * 50_000 + "]" * 50_000,
            '{"type": "resize", "cols": 1' + "0" * 5000 + ', "rows": 5}',
            '{"type": "input", "data": "\\ud800"}',  # not Unicode: not JSON
            '{"type": "input", "data": NaN}',
            '{"type": 5}',
            '{"data": "no type"}',
            "[1, 2]",
            '"a string"',
            "5",
            "null",
            DEEP.encode(),
        ]
        await _typed_raw(t, frames)
        assert await t.run("echo alive") == "alive\r\n"
        assert not t.closed


async def test_terminal_commands_with_bad_fields_are_ignored(env: Env) -> None:
    async with terminal(env.d, env.token, "box", id="hostile-cmd") as t:
        await t.resize(100, 30)
        assert await t.run("stty size") == "30 100\r\n"
        for frame in (
            {"type": "resize", "cols": "x", "rows": 5},
            {"type": "resize", "cols": True, "rows": True},
            {"type": "resize", "cols": 10**300, "rows": 10**300},
            {"type": "resize", "cols": 1.5, "rows": 40},
            {"type": "resize", "cols": [[[[1]]]], "rows": {"a": 1}},
            {"type": "input", "data": 5},
            {"type": "input", "data": ["echo no\r"]},
            {"type": "input"},
            {"type": "no-such-type", "data": "echo no\r"},
        ):
            await t.ws.send_str(json.dumps(frame))
        # Nothing was typed: the next command line is clean and the size unchanged.
        assert await t.run("stty size") == "30 100\r\n"
        # A command's fields of any JSON type do not stop it being that command.
        await t.ws.send_str(json.dumps({"type": "ping", "data": {"x": [[1]]}, "cols": "x"}))
        await t.frame("pong", timeout=10)
        assert not t.closed


# ------------------------------------------------------------------ events frames


async def test_events_socket_survives_hostile_frames(env: Env) -> None:
    async with ApiClient(env.d, env.token) as c:
        ws = await c.ws("/api/containers/events")
        try:
            assert (await ws.receive_json(timeout=10))["type"] == "list"
            for frame in (DEEP, "[" * 100_000, *HOSTILE_BODIES.values(), '{"type": 5}', "5"):
                await ws.send_str(frame)
            await ws.send_bytes(DEEP.encode())
            await ws.send_str(json.dumps({"type": "ping"}))
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
            assert json.loads(msg.data) == {"type": "pong"}
        finally:
            await ws.close()
