"""Asynchronous Python client for the Rexec Container API that rexecd serves."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError

from rexecd import __version__
from rexecd.client.base import (
    DEFAULT_HOST,
    ApiError,
    ProtocolError,
    RexecClientError,
    TransportError,
    parse_host,
)
from rexecd.models import (
    EXEC_DEFAULT_TIMEOUT_S,
    EXEC_MAX_TIMEOUT_S,
    ActionResult,
    ContainerList,
    ContainerOut,
    ContainerStatus,
    DeleteResult,
    Event,
    ExecResult,
    FileList,
    Health,
    ImageList,
    ImportResult,
    PortForwardDeleted,
    PortForwardList,
    PortForwardOut,
    RoleList,
    SettingsResult,
    Stats,
    StreamProgress,
    TerminalFrame,
    TokenCreated,
    TokenList,
    TokenValidation,
    Version,
    VolumeDeleted,
    VolumeList,
)

__all__ = [
    "DEFAULT_HOST",
    "ApiError",
    "AsyncClient",
    "EventStream",
    "ExecStream",
    "ProtocolError",
    "RexecClientError",
    "TerminalSession",
    "TransportError",
    "parse_host",
]

WS_PROTOCOL: Final = "rexec.v1"
WS_TOKEN_PROTOCOL_PREFIX: Final = "rexec.token."
# States a freshly created container settles in; polling stops at the first of them.
SETTLED_STATES: Final[frozenset[str]] = frozenset({"running", "error", "stopped", "expired"})
# Replayed scrollback and bursts of output can make one terminal frame large.
_WS_MAX_MESSAGE: Final = 16 * 1024 * 1024
# Time to get a connection at all; long transfers have no total limit, but this still applies.
_CONNECT_TIMEOUT: Final = 30.0
# Slack on top of the server-side deadline of exec and stop, so the server answers first.
_SERVER_DEADLINE_SLACK: Final = 30.0
# A restart is a stop (10 s grace by default) plus a start.
_RESTART_TIMEOUT: Final = 120.0

# The HTTP status an error frame of the exec stream stands for, by its code.
_STREAM_ERROR_STATUS: Final = {"exec_timeout": 504, "internal_error": 500, "container_stopped": 409}

M = TypeVar("M", bound=BaseModel)


# --- errors ----------------------------------------------------------------------------


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _error_from(
    status: int, reason: str | None, raw: bytes, headers: Mapping[str, str]
) -> ApiError:
    body: dict[str, Any]
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        body = parsed
    elif isinstance(parsed, dict) and "error" not in parsed:
        # A JSON answer of its own shape (an exec's 504 carries the partial output).
        body = {**parsed, "error": reason or f"HTTP {status}"}
    else:
        # A proxy in front of the daemon may answer with text or HTML; keep it readable.
        text = " ".join(raw.decode("utf-8", "replace").split())
        short = text if text and len(text) <= 200 and "<" not in text else ""
        body = {"error": short or reason or f"HTTP {status}"}
    retry_after = None
    if status == 429:
        retry_after = _number(body.get("retry_after"))
        if retry_after is None:
            retry_after = _number(headers.get("Retry-After"))
    return ApiError(status, body, retry_after=retry_after)


async def _read_error(resp: aiohttp.ClientResponse) -> ApiError:
    try:
        raw = await resp.read()
    except aiohttp.ClientError:
        raw = b""
    return _error_from(resp.status, resp.reason, raw, resp.headers)


async def _upgrade_errors(
    req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    # ws_connect drops the body of a refused upgrade, but the daemon explains the refusal
    # there (404 container_not_found, 400 container_stopped); read it before it is lost.
    resp = await handler(req)
    if resp.status >= 400 and req.headers.get("Upgrade", "").lower() == "websocket":
        raise await _read_error(resp)
    return resp


def _parse(model: type[M], data: Any, what: str) -> M:
    # Unknown keys are ignored: a newer daemon may add fields an older client does not know.
    try:
        return model.model_validate(data, extra="ignore")
    except ValidationError as e:
        raise ProtocolError(f"unexpected answer to {what}: {e}") from e


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _cpath(container: str, suffix: str = "") -> str:
    return "/api/containers/" + quote(container, safe="") + suffix


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# --- streams ---------------------------------------------------------------------------


class _SocketStream:
    """What both WebSocket streams share: ``async with`` connects and closes, and the
    stream is its own async iterator (``__anext__`` and ``connect`` are theirs)."""

    _ws: aiohttp.ClientWebSocketResponse | None

    async def connect(self) -> Self:
        raise NotImplementedError

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self


class EventStream(_SocketStream):
    """The ``/api/containers/events`` WebSocket as an async iterator of :class:`Event`.

    Connects on ``async with`` or on the first iteration; iteration ends when the daemon
    closes the socket. Frames of a type this client does not know are skipped.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._done = False

    async def connect(self) -> Self:
        if self._ws is None:
            self._ws = await self._client._ws_connect("/api/containers/events")
        return self

    async def ping(self) -> None:
        """Ask the daemon for a ``pong`` event, to check the stream is alive."""
        await self.connect()
        assert self._ws is not None
        await self._ws.send_str(json.dumps({"type": "ping"}))

    async def close(self) -> None:
        self._done = True
        await super().close()

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        await self.connect()
        assert self._ws is not None
        while True:
            msg = await self._ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.PING):
                    continue
                await self.close()
                raise StopAsyncIteration
            try:
                return Event.model_validate_json(msg.data, extra="ignore")
            except ValidationError:
                continue


class TerminalSession(_SocketStream):
    """One session of the terminal WebSocket ``/ws/terminal/{id}``.

    Use as ``async with client.terminal("web") as term:``; ``receive()`` (or iteration)
    yields the daemon's frames and returns None (ends) once the socket is closed.
    Non-JSON frames from the daemon are handed over as ``output`` frames.
    """

    def __init__(
        self, client: AsyncClient, container: str, session: str | None, new_session: bool
    ) -> None:
        self._client = client
        self.container = container
        self.session = session
        self.new_session = new_session
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed

    @property
    def close_code(self) -> int | None:
        return None if self._ws is None else self._ws.close_code

    @property
    def protocol(self) -> str | None:
        """The subprotocol the daemon accepted (``rexec.v1``)."""
        return None if self._ws is None else self._ws.protocol

    async def connect(self) -> Self:
        if self._ws is None:
            params: dict[str, str] = {}
            if self.session is not None:
                params["id"] = self.session
            if self.new_session:
                params["newSession"] = "true"
            path = "/ws/terminal/" + quote(self.container, safe="")
            self._ws = await self._client._ws_connect(path, params=params)
        return self

    def _socket(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise RuntimeError("terminal session is not connected")
        return self._ws

    async def send_frame(self, frame: TerminalFrame) -> None:
        await self._socket().send_str(frame.to_wire())

    async def send_input(self, data: str) -> None:
        """Type ``data`` into the shell (``"\\r"`` is Enter, ``"\\x03"`` is Ctrl-C)."""
        if data:
            await self.send_frame(TerminalFrame(type="input", data=data))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes to the PTY as they are, for input that is not UTF-8.

        The daemon writes any frame that does not parse as JSON straight to the PTY.
        """
        if data:
            await self._socket().send_bytes(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self.send_frame(TerminalFrame(type="resize", cols=cols, rows=rows))

    async def ping(self) -> None:
        await self.send_frame(TerminalFrame(type="ping"))

    async def receive(self) -> TerminalFrame | None:
        ws = self._socket()
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    return TerminalFrame.model_validate_json(msg.data)
                except ValidationError:
                    try:
                        json.loads(msg.data)
                    except ValueError:
                        return TerminalFrame(type="output", data=msg.data)
                    # Valid JSON of a frame type this client does not know: skip it.
                    continue
            if msg.type is aiohttp.WSMsgType.BINARY:
                return TerminalFrame(type="output", data=msg.data.decode("utf-8", "replace"))
            if msg.type is aiohttp.WSMsgType.PING:
                continue
            return None

    async def __anext__(self) -> TerminalFrame:
        frame = await self.receive()
        if frame is None:
            raise StopAsyncIteration
        return frame


class ExecStream(_SocketStream):
    """One interactive exec over ``/api/containers/{id}/exec/stream``.

    ``receive()`` yields ``("stdout"|"stderr", bytes)`` for output and finally
    ``("exit", code)``, or ``("error", ApiError)`` when the daemon ended it with an
    error (a timeout is one, status 504); then None once the socket is closed.
    """

    def __init__(self, client: AsyncClient, container: str, start: dict[str, Any]) -> None:
        self._client = client
        self.container = container
        self._start = {"type": "start", **start}
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self) -> Self:
        if self._ws is None:
            path = _cpath(self.container, "/exec/stream")
            self._ws = await self._client._ws_connect(path)
            await self._ws.send_str(json.dumps(self._start))
        return self

    def _socket(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise RuntimeError("exec stream is not connected")
        return self._ws

    async def _send(self, frame: dict[str, Any]) -> None:
        await self._socket().send_str(json.dumps(frame))

    async def send_stdin(self, data: bytes) -> None:
        if data:
            await self._socket().send_bytes(data)

    async def close_stdin(self) -> None:
        """End of input (Ctrl-D on a PTY)."""
        await self._send({"type": "eof"})

    async def resize(self, cols: int, rows: int) -> None:
        await self._send({"type": "resize", "cols": cols, "rows": rows})

    async def signal(self, name: str | int) -> None:
        """Send a signal (``"INT"``, ``"TERM"``, ``15``...) to the command's process group."""
        await self._send({"type": "signal", "signal": name})

    async def receive(self) -> tuple[str, Any] | None:
        ws = self._socket()
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                data: bytes = msg.data
                if data:
                    return ("stderr" if data[0] == 2 else "stdout"), data[1:]
                continue
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(frame, dict):
                    continue
                if frame.get("type") == "exit" and isinstance(frame.get("exit_code"), int):
                    return "exit", frame["exit_code"]
                if frame.get("type") == "error":
                    status = _STREAM_ERROR_STATUS.get(str(frame.get("code")), 400)
                    return "error", _error_from(status, None, msg.data.encode(), {})
                continue
            if msg.type is aiohttp.WSMsgType.PING:
                continue
            return None

    async def __anext__(self) -> tuple[str, Any]:
        item = await self.receive()
        if item is None:
            raise StopAsyncIteration
        return item


class _SseParser:
    """Incremental Server-Sent Events parser; yields the data of each complete event.

    Lines end in LF or CRLF (what every HTTP server sends); only ``data:`` fields
    matter to the Rexec stream, so ``event:``, ``id:`` and comments are dropped.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buffer[: end + 1]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                if field == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def finish(self) -> list[str]:
        """Events left when the stream ends without a closing blank line."""
        return self.feed(b"\n\n")


# --- the client ------------------------------------------------------------------------


class AsyncClient:
    """Async client for one rexecd daemon.

    ``host`` is ``unix:/path/to.sock`` or ``http://HOST:PORT`` (default: ``$REXEC_HOST``,
    else ``unix:/run/rexecd/rexecd.sock``); ``token`` defaults to ``$REXEC_TOKEN``.
    ``timeout`` bounds each ordinary request; exec, stop, streams, file transfers and
    image imports get their own limits. Every ``container`` argument accepts the runtime
    id, the db id or the name. Use it as an async context manager, or call ``close()``;
    one client belongs to the event loop it is first used on.
    """

    def __init__(
        self, host: str | None = None, token: str | None = None, *, timeout: float | None = 60.0
    ) -> None:
        self.host = host or os.environ.get("REXEC_HOST") or DEFAULT_HOST
        # An explicit "" means "no token", even when REXEC_TOKEN is set.
        self.token = (token if token is not None else os.environ.get("REXEC_TOKEN")) or None
        self._base, self._socket_path = parse_host(self.host)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=_CONNECT_TIMEOUT)
        self._http: aiohttp.ClientSession | None = None
        #: ``(limit, remaining)`` from the most recent response's X-RateLimit headers.
        self.rate_limit: tuple[int, int] | None = None

    # -- plumbing --

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector: aiohttp.BaseConnector
            if self._socket_path is not None:
                connector = aiohttp.UnixConnector(path=self._socket_path)
            else:
                connector = aiohttp.TCPConnector()
            headers = {"User-Agent": f"rexec-python/{__version__}", "Accept": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._http = aiohttp.ClientSession(
                connector=connector,
                headers=headers,
                timeout=self._timeout,
                middlewares=(_upgrade_errors,),
            )
        return self._http

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"timed out talking to the daemon at {self.host}"
        if isinstance(exc, aiohttp.ClientConnectorError):
            cause = exc.os_error.strerror or str(exc.os_error)
            return f"cannot reach the daemon at {self.host}: {cause}"
        return f"connection to the daemon at {self.host} failed: {exc or type(exc).__name__}"

    def _note_rate_limit(self, resp: aiohttp.ClientResponse) -> None:
        limit = resp.headers.get("X-RateLimit-Limit")
        remaining = resp.headers.get("X-RateLimit-Remaining")
        if limit is not None and remaining is not None:
            try:
                self.rate_limit = (int(limit), int(remaining))
            except ValueError:
                pass

    @asynccontextmanager
    async def _open(
        self, method: str, path: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self._session().request(method, self._base + path, **kwargs) as resp:
                self._note_rate_limit(resp)
                if resp.status >= 400:
                    raise await _read_error(resp)
                yield resp
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransportError(self._describe(e)) from e

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._open(method, path, **kwargs) as resp:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise TransportError(self._describe(e)) from e
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ProtocolError(f"answer to {method} {path} is not JSON") from e

    async def _call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return _parse(model, await self._json(method, path, **kwargs), f"{method} {path}")

    async def _ws_connect(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> aiohttp.ClientWebSocketResponse:
        protocols = [WS_PROTOCOL]
        if self.token:
            # Browsers cannot set Authorization on a WebSocket, so the daemon also reads
            # the token from the subprotocol list; send both so proxies may strip either.
            protocols.append(WS_TOKEN_PROTOCOL_PREFIX + self.token)
        try:
            return await self._session().ws_connect(
                self._base + path,
                protocols=protocols,
                params=dict(params or {}),
                max_msg_size=_WS_MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_close=10.0),
            )
        except aiohttp.WSServerHandshakeError as e:
            raise ProtocolError(f"WebSocket upgrade of {path} refused: {e.message}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransportError(self._describe(e)) from e

    @staticmethod
    def _long(total: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, sock_connect=_CONNECT_TIMEOUT)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- daemon --

    async def health(self) -> Health:
        """``GET /health`` (needs no token)."""
        return await self._call(Health, "GET", "/health")

    async def version(self) -> Version:
        return await self._call(Version, "GET", "/api/version")

    async def openapi(self) -> dict[str, Any]:
        """The daemon's OpenAPI 3 document."""
        doc = await self._json("GET", "/api/openapi.json")
        if not isinstance(doc, dict):
            raise ProtocolError("the OpenAPI document is not a JSON object")
        return doc

    # -- containers --

    async def list_containers(self) -> ContainerList:
        """``GET /containers``: the caller's containers, newest first."""
        return await self._call(ContainerList, "GET", "/api/containers")

    async def get(self, container: str) -> ContainerOut:
        return await self._call(ContainerOut, "GET", _cpath(container))

    async def create(
        self,
        image: str,
        *,
        name: str | None = None,
        role: str | None = None,
        custom_image: str | None = None,
        memory_mb: int | None = None,
        cpu_shares: int | None = None,
        disk_mb: int | None = None,
        environment: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        wait: bool = False,
        wait_timeout: float = 300.0,
        poll_interval: float = 1.0,
    ) -> ContainerOut:
        """``POST /containers``: answered at once with ``status: "creating"``.

        With ``wait=True``, poll until the container settles (running, error, stopped or
        expired) and return it in that state; ``TimeoutError`` after ``wait_timeout`` s.
        """
        body = self._create_body(
            image, name, role, custom_image, memory_mb, cpu_shares, disk_mb, environment, labels
        )
        created = await self._call(ContainerOut, "POST", "/api/containers", json=body)
        if not wait or created.status in SETTLED_STATES:
            return created
        return await self.wait_for(
            created.id, SETTLED_STATES, timeout=wait_timeout, interval=poll_interval
        )

    async def create_stream(
        self,
        image: str,
        *,
        name: str | None = None,
        role: str | None = None,
        custom_image: str | None = None,
        memory_mb: int | None = None,
        cpu_shares: int | None = None,
        disk_mb: int | None = None,
        environment: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamProgress]:
        """``POST /containers/stream``: the creation's progress, stage by stage.

        The last frame has ``complete`` set (with ``container``) or carries ``error``.
        Refusals before the stream starts (quota, rate limit, bad body) raise ApiError.
        """
        body = self._create_body(
            image, name, role, custom_image, memory_mb, cpu_shares, disk_mb, environment, labels
        )
        path = "/api/containers/stream"
        async with self._open(
            "POST",
            path,
            json=body,
            headers={"Accept": "text/event-stream"},
            timeout=self._long(),
        ) as resp:
            parser = _SseParser()
            try:
                async for chunk in resp.content.iter_any():
                    for data in parser.feed(chunk):
                        yield self._progress(data, path)
            except (aiohttp.ClientError, TimeoutError) as e:
                raise TransportError(self._describe(e)) from e
            for data in parser.finish():
                yield self._progress(data, path)

    @staticmethod
    def _progress(data: str, path: str) -> StreamProgress:
        try:
            payload = json.loads(data)
        except ValueError as e:
            raise ProtocolError(f"{path}: event data is not JSON: {data[:80]!r}") from e
        return _parse(StreamProgress, payload, path)

    @staticmethod
    def _create_body(
        image: str,
        name: str | None,
        role: str | None,
        custom_image: str | None,
        memory_mb: int | None,
        cpu_shares: int | None,
        disk_mb: int | None,
        environment: Mapping[str, str] | None,
        labels: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        body = _drop_none(
            image=image,
            name=name,
            role=role,
            custom_image=custom_image,
            memory_mb=memory_mb,
            cpu_shares=cpu_shares,
            disk_mb=disk_mb,
        )
        if environment:
            body["environment"] = dict(environment)
        if labels:
            body["labels"] = dict(labels)
        return body

    async def wait_for(
        self,
        container: str,
        states: Iterable[ContainerStatus | str] = ("running",),
        *,
        timeout: float = 300.0,
        interval: float = 1.0,
    ) -> ContainerOut:
        """Poll ``GET /containers/{id}`` until the status is one of ``states``.

        Also returns as soon as the container is in ``error``, since it will not leave
        that state by itself. A 429 while polling waits out ``retry_after`` instead of
        failing. Raises ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        wanted = set(states) | {"error"}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        status = "unknown"
        while True:
            pause = interval
            try:
                current = await self.get(container)
            except ApiError as e:
                if e.status != 429:
                    raise
                pause = max(interval, e.retry_after or interval)
            else:
                if current.status in wanted:
                    return current
                status = current.status
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"container {container} still {status} after {timeout:g}s")
            await asyncio.sleep(min(pause, left))

    async def start(self, container: str) -> ActionResult:
        return await self._call(ActionResult, "POST", _cpath(container, "/start"))

    async def stop(self, container: str, timeout: float | None = None) -> ActionResult:
        """Stop: SIGTERM, then SIGKILL after ``timeout`` seconds (daemon default 10)."""
        params = {} if timeout is None else {"timeout": _seconds(timeout)}
        grace = 10.0 if timeout is None else timeout
        return await self._call(
            ActionResult,
            "POST",
            _cpath(container, "/stop"),
            params=params,
            timeout=self._long(grace + _SERVER_DEADLINE_SLACK),
        )

    async def restart(self, container: str) -> ActionResult:
        return await self._call(
            ActionResult,
            "POST",
            _cpath(container, "/restart"),
            timeout=self._long(_RESTART_TIMEOUT),
        )

    async def delete(self, container: str, volumes: bool = False) -> DeleteResult:
        """Delete the container; ``volumes=True`` also drops its kept ``/home/user``."""
        params = {"volumes": "true"} if volumes else {}
        return await self._call(DeleteResult, "DELETE", _cpath(container), params=params)

    async def update_settings(
        self,
        container: str,
        *,
        name: str | None = None,
        memory_mb: int | None = None,
        cpu_shares: int | None = None,
        disk_mb: int | None = None,
    ) -> SettingsResult:
        body = _drop_none(name=name, memory_mb=memory_mb, cpu_shares=cpu_shares, disk_mb=disk_mb)
        return await self._call(SettingsResult, "PATCH", _cpath(container, "/settings"), json=body)

    async def exec(
        self,
        container: str,
        command: str | Sequence[str],
        *,
        workdir: str | None = None,
        env: Mapping[str, str] | Sequence[str] | None = None,
        user: str | None = None,
        timeout_seconds: int | None = None,
    ) -> ExecResult:
        """Run a command to completion: a string runs under ``sh -c``, a sequence as argv.

        A command that outlives ``timeout_seconds`` raises ApiError 504, whose body
        holds the partial output.
        """
        body: dict[str, Any]
        body = {"command": command} if isinstance(command, str) else {"cmd": list(command)}
        if workdir is not None:
            body["workdir"] = workdir
        if env:
            if isinstance(env, Mapping):
                body["env"] = [f"{k}={v}" for k, v in env.items()]
            else:
                body["env"] = list(env)
        if user is not None:
            body["user"] = user
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        limit = min(timeout_seconds or EXEC_DEFAULT_TIMEOUT_S, EXEC_MAX_TIMEOUT_S)
        return await self._call(
            ExecResult,
            "POST",
            _cpath(container, "/exec"),
            json=body,
            timeout=self._long(limit + _SERVER_DEADLINE_SLACK),
        )

    async def logs(self, container: str, follow: bool = False) -> AsyncIterator[bytes]:
        """The container's log (its init's output, role installs) as byte chunks; with
        ``follow``, new output keeps coming while the container runs."""
        params = {"follow": "true"} if follow else {}
        async with self._open(
            "GET", _cpath(container, "/logs"), params=params, timeout=self._long()
        ) as resp:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as e:
                raise TransportError(self._describe(e)) from e

    async def stats(self, container: str) -> Stats:
        return await self._call(Stats, "GET", _cpath(container, "/stats"))

    # -- files --

    async def upload_file(
        self,
        container: str,
        directory: str,
        content: bytes | IO[bytes] | os.PathLike[str],
        *,
        filename: str | None = None,
    ) -> dict[str, Any]:
        """Upload one file into ``directory`` of the (running) container.

        ``content`` is the bytes, an open binary file or a local path; ``filename``
        defaults to the local file's name and must be given for bytes.
        """
        if isinstance(content, os.PathLike):
            local = Path(content)
            with local.open("rb") as f:
                return await self._upload(container, directory, f, filename or local.name)
        if filename is None:
            filename = os.path.basename(str(getattr(content, "name", "")))
            if not filename:
                raise ValueError("filename is required when uploading bytes")
        return await self._upload(container, directory, content, filename)

    async def _upload(
        self, container: str, directory: str, content: bytes | IO[bytes], filename: str
    ) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("file", content, filename=filename, content_type="application/octet-stream")
        answer = await self._json(
            "POST",
            _cpath(container, "/files"),
            params={"path": directory},
            data=form,
            timeout=self._long(),
        )
        return answer if isinstance(answer, dict) else {"result": answer}

    async def download_file(self, container: str, path: str) -> bytes:
        """The content of one file of the (running) container."""
        async with self._open(
            "GET",
            _cpath(container, "/files"),
            params={"path": path},
            headers={"Accept": "*/*"},
            timeout=self._long(),
        ) as resp:
            try:
                return await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise TransportError(self._describe(e)) from e

    async def list_files(self, container: str, path: str = "/") -> FileList:
        return await self._call(
            FileList, "GET", _cpath(container, "/files/list"), params={"path": path}
        )

    async def delete_file(self, container: str, path: str) -> dict[str, Any]:
        answer = await self._json("DELETE", _cpath(container, "/files"), params={"path": path})
        return answer if isinstance(answer, dict) else {"result": answer}

    async def mkdir(self, container: str, path: str) -> dict[str, Any]:
        answer = await self._json("POST", _cpath(container, "/files/mkdir"), params={"path": path})
        return answer if isinstance(answer, dict) else {"result": answer}

    # -- port forwards --

    async def add_port_forward(
        self,
        container: str,
        container_port: int,
        *,
        host_port: int | None = None,
        protocol: str = "tcp",
    ) -> PortForwardOut:
        """Forward ``127.0.0.1:host_port`` on the daemon's host to the (running) container's
        port; without ``host_port`` the daemon picks a free one from its range. The forward
        ends when it is deleted or the container stops."""
        body = _drop_none(container_port=container_port, host_port=host_port, protocol=protocol)
        return await self._call(
            PortForwardOut, "POST", _cpath(container, "/port-forwards"), json=body
        )

    async def list_port_forwards(self, container: str) -> PortForwardList:
        return await self._call(PortForwardList, "GET", _cpath(container, "/port-forwards"))

    async def delete_port_forward(self, container: str, forward_id: str) -> PortForwardDeleted:
        path = _cpath(container, "/port-forwards/" + quote(forward_id, safe=""))
        return await self._call(PortForwardDeleted, "DELETE", path)

    # -- volumes --

    async def list_volumes(self) -> VolumeList:
        """Your /home/user volumes: in use by the container of their name, or kept after
        its delete (reused when that name is created again), with the tier's caps."""
        return await self._call(VolumeList, "GET", "/api/volumes")

    async def delete_volume(self, name: str) -> VolumeDeleted:
        """Delete a kept volume and its data (409 while a container of that name exists)."""
        return await self._call(VolumeDeleted, "DELETE", "/api/volumes/" + quote(name, safe=""))

    # -- images, roles --

    async def images(self) -> ImageList:
        return await self._call(ImageList, "GET", "/api/images")

    async def roles(self) -> RoleList:
        return await self._call(RoleList, "GET", "/api/roles")

    async def import_image(
        self, path: str | os.PathLike[str], name: str | None = None
    ) -> ImportResult:
        """Upload an OCI-layout or docker-archive tarball (admin scope); ``name`` tags it."""
        params = {} if name is None else {"name": name}
        with Path(path).open("rb") as f:
            return await self._call(
                ImportResult,
                "POST",
                "/api/images/import",
                params=params,
                data=f,
                headers={"Content-Type": "application/x-tar"},
                timeout=self._long(),
            )

    # -- tokens --

    async def create_token(
        self,
        name: str,
        scopes: Sequence[str] | None = None,
        expires_in: int | None = None,
    ) -> TokenCreated:
        """A new API token; its secret (``.token``) is only ever shown in this answer.

        ``expires_in`` is in days.
        """
        body = _drop_none(
            name=name, scopes=None if scopes is None else list(scopes), expires_in=expires_in
        )
        return await self._call(TokenCreated, "POST", "/api/tokens", json=body)

    async def list_tokens(self) -> TokenList:
        return await self._call(TokenList, "GET", "/api/tokens")

    async def revoke_token(self, token_id: str) -> dict[str, Any]:
        answer = await self._json("DELETE", "/api/tokens/" + quote(token_id, safe=""))
        return answer if isinstance(answer, dict) else {"result": answer}

    async def validate_token(self) -> TokenValidation:
        """Who the client's token belongs to, its tier and scopes."""
        return await self._call(TokenValidation, "GET", "/api/tokens/validate")

    # -- WebSockets --

    def events(self) -> EventStream:
        """The live container events; the first one is a ``list`` of every container."""
        return EventStream(self)

    def exec_stream(
        self,
        container: str,
        command: str | Sequence[str],
        *,
        tty: bool = False,
        size: tuple[int, int] | None = None,
        workdir: str | None = None,
        env: Sequence[str] | None = None,
        user: str | None = None,
        timeout_seconds: int | None = None,
    ) -> ExecStream:
        """An interactive exec (not yet connected: use ``async with``); ``size`` is
        ``(cols, rows)`` of the PTY with ``tty``. No deadline unless one is given."""
        start: dict[str, Any]
        start = {"command": command} if isinstance(command, str) else {"cmd": list(command)}
        start["tty"] = tty
        if size is not None:
            start["cols"], start["rows"] = size
        start.update(_drop_none(workdir=workdir, user=user, timeout_seconds=timeout_seconds))
        if env:
            start["env"] = list(env)
        return ExecStream(self, container, start)

    def terminal(
        self, container: str, session: str | None = None, new_session: bool = False
    ) -> TerminalSession:
        """A terminal session on ``container`` (not yet connected: use ``async with``).

        ``session`` names the session (the daemon's default is ``default``): connecting
        to an existing one takes it over and replays its recent output.
        ``new_session=True`` always starts a fresh shell.
        """
        return TerminalSession(self, container, session, new_session)
