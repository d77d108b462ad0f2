"""Helpers for the terminal WebSocket tests (no tests here): a client over a real
``/ws/terminal/{id}`` socket that assembles output frames and runs shell commands
between unique markers, so the echoed command line and the prompt never reach the
text a test compares."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from .daemon import TEST_IMAGES, Daemon, api, wait_status

BUSYBOX_TAR = TEST_IMAGES / "busybox.tar"
CLOSED = (
    aiohttp.WSMsgType.CLOSE,
    aiohttp.WSMsgType.CLOSING,
    aiohttp.WSMsgType.CLOSED,
    aiohttp.WSMsgType.ERROR,
)


@contextmanager
def running_daemon(base: Path, overrides: dict[str, Any] | None = None) -> Iterator[Daemon]:
    """A started daemon with the busybox image imported; closed (everything removed) after."""
    d = Daemon(base, overrides or {})
    try:
        d.import_image(BUSYBOX_TAR)
        d.start()
        yield d
    finally:
        d.close()


def create_running(d: Daemon, token: str, name: str) -> dict[str, Any]:
    code, body, _ = api(d, "POST", "/api/containers", token, {"image": "busybox", "name": name})
    assert code == 202, body
    return wait_status(d, token, name, "running")


def exec_sh(d: Daemon, token: str, ref: str, command: str) -> str:
    code, body, _ = api(d, "POST", f"/api/containers/{ref}/exec", token, {"command": command})
    assert code == 200, body
    out: str = body["stdout"]
    return out


def ws_url(d: Daemon, ref: str, **query: str) -> str:
    url = d.url.replace("http://", "ws://") + f"/ws/terminal/{ref}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


class Term:
    """One terminal socket: non-output frames in ``frames``, output text in ``out``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.kinds: list[str] = []  # every frame's type, output included, in order
        self.out = ""
        self.pos = 0  # ``expect`` consumes ``out`` up to here
        self.closed = False
        self.close_msg: aiohttp.WSMessage | None = None

    async def pump_one(self, timeout: float) -> bool:
        """Take one message; False on timeout. Sets ``closed`` when the socket ends."""
        if self.closed:
            return False
        try:
            msg = await self.ws.receive(timeout=max(timeout, 0.001))
        except TimeoutError:
            return False
        if msg.type in CLOSED:
            self.closed = True
            self.close_msg = msg
            return True
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        self.kinds.append(frame["type"])
        if frame["type"] == "output":
            self.out += frame["data"]
        else:
            self.frames.append(frame)
        return True

    async def until(self, cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(
                    f"timed out waiting for {what or cond}; closed={self.closed}; "
                    f"frames={self.frames[-5:]}; tail={self.out[-400:]!r}"
                )
            await self.pump_one(left)

    async def expect(self, text: str, timeout: float = 15.0) -> str:
        """Wait for ``text`` after ``pos``; returns what came before it and moves past it."""
        await self.until(lambda: text in self.out[self.pos :], timeout, repr(text))
        i = self.out.index(text, self.pos)
        before = self.out[self.pos : i]
        self.pos = i + len(text)
        return before

    async def frame(self, kind: str, timeout: float = 15.0) -> dict[str, Any]:
        def seen() -> bool:
            return any(f["type"] == kind for f in self.frames)

        await self.until(seen, timeout, f"a {kind} frame")
        return next(f for f in self.frames if f["type"] == kind)

    async def wait_closed(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            assert left > 0, f"socket still open; frames={self.frames[-5:]}"
            await self.pump_one(left)

    async def send(self, data: str) -> None:
        await self.ws.send_str(json.dumps({"type": "input", "data": data}))

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def run(self, command: str, timeout: float = 30.0) -> str:
        """Output of ``command`` alone. The markers are typed as ``S''tok`` so the echoed
        command line never contains them; they are printed as ``Stok``."""
        tok = secrets.token_hex(4)
        await self.send(f"echo S''{tok}; {command}; echo E''{tok}\r")
        await self.expect(f"S{tok}\r\n", timeout)
        return await self.expect(f"E{tok}\r\n", timeout)

    async def ready(self, timeout: float = 15.0) -> dict[str, Any]:
        return await self.frame("shell_ready", timeout)


@asynccontextmanager
async def terminal(
    d: Daemon,
    token: str,
    ref: str,
    *,
    auth: str = "protocol",
    wait_ready: bool = True,
    **query: str,
) -> AsyncIterator[Term]:
    """A terminal socket authenticated by ``auth``: protocol, header or query."""
    headers: dict[str, str] = {}
    protocols: tuple[str, ...] = ()
    if auth == "protocol":
        protocols = ("rexec.v1", f"rexec.token.{token}")
    elif auth == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif auth == "query":
        query["token"] = token
    else:
        raise ValueError(auth)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            ws_url(d, ref, **query), protocols=protocols, headers=headers, autoping=True
        ) as ws,
    ):
        t = Term(ws)
        if wait_ready:
            await t.ready()
        yield t


def daemon_rss_kib(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
