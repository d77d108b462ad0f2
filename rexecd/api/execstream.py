"""``GET /api/containers/{id}/exec/stream``: an interactive exec over a WebSocket.

The protocol (also in the README): the client's first frame is a JSON ``start``
(``ExecStreamStart``); the daemon answers ``{"type": "started"}``, then output as
binary frames whose first byte is the channel (1 stdout, 2 stderr; a PTY is all 1),
and at the end ``{"type": "exit", "exit_code"}`` (or ``{"type": "error", ...}``)
before it closes. Binary frames from the client are stdin; JSON frames ``eof``,
``resize`` ``{cols, rows}``, ``signal`` ``{signal: "INT"}`` and ``ping`` steer it.
The process is killed when the socket goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import WSMsgType, web

from rexecd.api.auth import WS_PROTOCOLS, principal
from rexecd.api.containers import REF_ERRORS, ref
from rexecd.api.endpoint import Endpoint, WsFrames
from rexecd.api.keys import SERVICE, track_websocket
from rexecd.api.ratelimit import in_flight
from rexecd.api.wire import decode_json, parse_model
from rexecd.errors import ContainerNotRunning, ExecTimeout, InvalidJson, InvalidRequest, RexecError
from rexecd.models import (
    EXEC_STREAM_CLIENT_FRAMES,
    EXEC_STREAM_SERVER_FRAMES,
    ExecStreamFrame,
    ExecStreamStart,
)
from rexecd.service.execstream import STDERR, STDOUT, StreamProcess, parse_signal

START_TIMEOUT_S = 30.0
MAX_FRAME = 4 * 1024 * 1024
MSG_NOT_WEBSOCKET = "the exec stream is a WebSocket: connect with an Upgrade request"
MSG_NO_START = 'the first frame must be JSON {"type": "start", "cmd": [...]}'
FRAMES = WsFrames(
    first=ExecStreamStart,
    client=EXEC_STREAM_CLIENT_FRAMES,
    server=EXEC_STREAM_SERVER_FRAMES,
    client_binary="the process's stdin, as is",
    server_binary=f"output: the first byte is the channel ({STDOUT} stdout, {STDERR} "
    f"stderr; with tty everything is {STDOUT}), then the bytes",
)


class _Socket:
    """Frames out, one at a time: output and control frames share the socket."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.lock = asyncio.Lock()

    async def json(self, frame: dict[str, Any]) -> None:
        async with self.lock:
            await self.ws.send_str(json.dumps(frame, separators=(",", ":")))

    async def output(self, channel: int, data: bytes) -> None:
        async with self.lock:
            # send_bytes waits for the transport to drain: that is the backpressure.
            await self.ws.send_bytes(bytes((channel,)) + data)

    async def fail(self, exc: RexecError) -> None:
        with contextlib.suppress(Exception):
            await self.json({"type": "error", **exc.to_json()})
        await self.ws.close()


async def _start_frame(ws: web.WebSocketResponse) -> ExecStreamStart:
    try:
        msg = await ws.receive(timeout=START_TIMEOUT_S)
    except TimeoutError:
        raise InvalidRequest(MSG_NO_START) from None
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        raise InvalidRequest(MSG_NO_START)
    try:
        data = decode_json(msg.data)
    except InvalidJson:
        raise InvalidRequest(MSG_NO_START) from None
    return parse_model(ExecStreamStart, data)


async def _client_frames(ws: web.WebSocketResponse, sock: _Socket, proc: StreamProcess) -> None:
    """Stdin and commands from the client, until it closes its side."""
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await proc.write(msg.data)
            continue
        if msg.type != WSMsgType.TEXT:
            break
        try:
            cmd = decode_json(msg.data)
        except InvalidJson:
            continue  # a bad frame never ends the socket (like the terminal's)
        if not isinstance(cmd, dict):
            continue
        kind = cmd.get("type")
        if kind == "eof":
            await proc.close_stdin()
        elif kind == "resize":
            cols, rows = cmd.get("cols"), cmd.get("rows")
            if type(cols) is int and type(rows) is int:
                proc.resize(cols, rows)
        elif kind == "signal":
            signum = parse_signal(cmd.get("signal"))
            if signum is not None:
                proc.signal(signum)
        elif kind == "ping":
            await sock.json({"type": "pong"})


async def exec_stream(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    service = request.app[SERVICE]
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=MAX_FRAME)
    if not ws.can_prepare(request).ok:
        raise InvalidRequest(MSG_NOT_WEBSOCKET)
    # Before the upgrade, so a wrong name or a stopped container is a plain JSON answer.
    c = await service.get_container(p, ref(request))
    if c.status != "running":
        raise ContainerNotRunning("container is not running", status=c.status)
    await ws.prepare(request)
    track_websocket(request, ws)
    sock = _Socket(ws)
    try:
        start = await _start_frame(ws)
        proc = await service.open_exec_stream(p, c.id, start)
    except RexecError as exc:
        await sock.fail(exc)
        return ws
    await sock.json({"type": "started"})
    runner = asyncio.ensure_future(proc.run(sock.output))
    reader = asyncio.ensure_future(_client_frames(ws, sock, proc))
    try:
        await asyncio.wait((runner, reader), return_when=asyncio.FIRST_COMPLETED)
        if not runner.done():
            # The client went away: the process goes with it (run's cancel kills it).
            return ws
        status = runner.result()
        if proc.timed_out:
            await sock.fail(ExecTimeout(f"command timed out after {proc.timeout:g} s"))
        elif status is None:
            await sock.fail(RexecError("the command's exit status was lost"))
        else:
            with contextlib.suppress(Exception):
                await sock.json({"type": "exit", "exit_code": status})
            await ws.close()
    finally:
        for task in (runner, reader):
            task.cancel()
        await asyncio.gather(runner, reader, return_exceptions=True)
        proc.close()
    return ws


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/api/containers/{id}/exec/stream",
        in_flight("exec", exec_stream),
        "WebSocket: an interactive exec. First frame {type: start, cmd|command, tty, cols, "
        "rows, env, workdir, user, timeout_seconds}; output comes as binary frames "
        "(first byte 1 stdout, 2 stderr), stdin goes as binary frames; JSON frames eof, "
        "resize, signal, ping; the last frame is {type: exit, exit_code} or an error. "
        "The process is killed when the socket closes",
        "exec",
        response=ExecStreamFrame,
        frames=FRAMES,
        status=101,
        errors=(400, *REF_ERRORS, 409),
        websocket=True,
        # A GET that runs a command: as the one-shot exec, write scope and exec's budget.
        scope="write",
        rate="exec",
    ),
)
