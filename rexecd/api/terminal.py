"""``GET /ws/terminal/{id}``: the terminal WebSocket over a session's PTY (API.md framing)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from rexecd.api.auth import WS_PROTOCOLS, principal
from rexecd.api.containers import REF_ERRORS
from rexecd.api.endpoint import Endpoint, Query
from rexecd.api.keys import SERVICE, track_websocket
from rexecd.api.wire import decode_json
from rexecd.errors import InvalidJson, SessionEnded, TerminalNotRunning
from rexecd.models import TerminalFrame
from rexecd.service.interface import Terminal

log = logging.getLogger(__name__)

PING_INTERVAL_S = 15.0
STATS_INTERVAL_S = 5.0
MAX_FRAME = 4 * 1024 * 1024


class WsClient:
    """A session's client over one WebSocket: output frames, in order, with backpressure."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.transport = request.transport
        self.lock = asyncio.Lock()
        # PTY reads may split a UTF-8 sequence; keep the tail for the next frame.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.lock:
            # send_str waits for the transport to drain: that is the backpressure.
            await self.ws.send_str(json.dumps(frame, separators=(",", ":")))

    async def send_output(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        if text:
            await self.send({"type": "output", "data": text})

    async def end(self, kind: str, message: str, exit_code: int | None = None) -> None:
        frame_type = "container_status" if kind == "container_status" else "error"
        frame: dict[str, Any] = {"type": frame_type, "data": message, "code": SessionEnded.code}
        if exit_code is not None:
            # Additive: a client that knows the field exits with the shell's status.
            frame["exit_code"] = exit_code
        with contextlib.suppress(Exception):
            await self.send(frame)
        await self.ws.close(message=message.encode()[:120])

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _ticker(client: WsClient, interval: float, make: Any) -> None:
    while True:
        await asyncio.sleep(interval)
        frame = await make()
        if frame is not None:
            await client.send(frame)


def _command(raw: str | bytes) -> dict[str, Any] | None:
    """The frame as a command: a JSON object whose ``type`` is a string; else None.

    Whatever is not (not strict JSON by ``decode_json``, nested past the decoder's
    depth, a bare number or string, an object without a string type) is keystrokes.
    """
    try:
        msg = decode_json(raw)
    except InvalidJson:
        return None
    if isinstance(msg, dict) and isinstance(msg.get("type"), str):
        return msg
    return None


def _size(value: Any) -> int | None:
    # bool is an int to Python, not a size to a client.
    return value if type(value) is int else None


async def _handle_frame(session: Terminal, client: WsClient, raw: str | bytes) -> None:
    """A command by its type; any other frame goes to the PTY as is.

    A command of an unknown type, or of a known type whose fields have the wrong
    JSON types (``{"type": "resize", "cols": "x"}``), is ignored: it names itself a
    command, so it is not typed into the shell; and it never ends the socket.
    """
    msg = _command(raw)
    if msg is None:
        await session.write(raw.encode() if isinstance(raw, str) else raw)
        return
    kind = msg["type"]
    if kind == "input":
        data = msg.get("data")
        if isinstance(data, str):
            await session.write(data.encode())
    elif kind == "resize":
        cols, rows = _size(msg.get("cols")), _size(msg.get("rows"))
        if cols is not None and rows is not None:
            session.resize(cols, rows)
    elif kind == "ping":
        await client.send({"type": "pong"})


async def terminal(request: web.Request) -> web.StreamResponse:
    """Before the upgrade, a missing or stopped container is an error answer like any
    other (404 ``container_not_found``, 400 ``container_stopped``); after it, failures
    are ``error`` frames."""
    service = request.app[SERVICE]
    p = principal(request)
    ref = request.match_info["id"]
    c = await service.get_container(p, ref)
    if c.status != "running":
        raise TerminalNotRunning("container is not running", status=c.status)
    session_id = request.query.get("id") or "default"
    new = request.query.get("newSession", "").lower() in ("1", "true", "yes")
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=MAX_FRAME)
    await ws.prepare(request)
    track_websocket(request, ws)
    client = WsClient(ws, request)
    await client.send({"type": "connected", "data": c.id})
    await client.send({"type": "shell_starting"})
    try:
        session, fresh = await service.terminal_session(p, ref, session_id, new, 80, 24)
    except Exception as exc:  # the socket is open: report, then close
        message = getattr(exc, "message", None) or "could not start a shell"
        log.warning("terminal for %s: %s", ref, message)
        await client.send({"type": "error", "data": message})
        await ws.close()
        return ws
    # shell_ready goes before any output (the replay, then live output): a client may
    # reset its screen on shell_ready, which must not wipe what was just replayed.
    # attach() holds the session's output until resume(), so nothing overtakes it.
    replay = await session.attach(client)
    try:
        await client.send({"type": "shell_ready", "data": "new" if fresh else "resumed"})
        if replay:
            await client.send_output(replay)
    finally:
        session.resume(client)

    async def stats() -> dict[str, Any] | None:
        try:
            s = await service.stats(p, ref)
        except Exception:  # a stopped container ends the session separately
            return None
        return {"type": "stats", "data": s.model_dump_json()}

    async def ping() -> dict[str, Any]:
        return {"type": "ping"}

    tickers = [
        asyncio.ensure_future(_ticker(client, PING_INTERVAL_S, ping)),
        asyncio.ensure_future(_ticker(client, STATS_INTERVAL_S, stats)),
    ]
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT or msg.type == WSMsgType.BINARY:
                await _handle_frame(session, client, msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        for t in tickers:
            t.cancel()
        session.detach(client)
    return ws


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/ws/terminal/{id}",
        terminal,
        "WebSocket: a shell on a PTY in the running container, JSON frames both ways "
        '(client: input, resize, ping; any other frame is typed as is). Needs the "write" '
        "scope: a terminal changes the container although it is a GET",
        "terminal",
        response=TerminalFrame,
        status=101,
        errors=(400, *REF_ERRORS),
        query=(
            Query("id", "session name (default `default`); the same name takes it over"),
            Query("newSession", "true: always start a fresh shell", type="boolean"),
        ),
        websocket=True,
        scope="write",
    ),
)
