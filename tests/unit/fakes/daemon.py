"""A fake rexecd for the client tests: hand-written handlers that imitate API.md."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

TOKEN = "rexec_" + "ab" * 24
STAMP = "2024-05-01T12:00:00Z"
WS_PATHS = ("/ws/", "/api/containers/events")


@dataclass
class Seen:
    """One request as the fake daemon received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    raw: bytes = b""


@dataclass
class Override:
    """The answer to give to the next request, whatever it is."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    text: str | None = None


def container(
    name: str, status: str = "running", image: str = "ubuntu", **extra: Any
) -> dict[str, Any]:
    return {
        "id": hashlib.sha256(name.encode()).hexdigest(),
        "db_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        "user_id": "user-1",
        "name": name,
        "image": image,
        "role": None,
        "status": status,
        "created_at": STAMP,
        "last_used_at": None,
        "idle_seconds": 3,
        "ip_address": "10.88.0.2",
        "expires_at": None,
        "resources": {"memory_mb": 512, "cpu_shares": 500, "disk_mb": 2048, "network_mbps": 0},
        **extra,
    }


def _error(http_status: int, message: str, /, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=http_status)


class _Refusal(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


class FakeDaemon:
    """State and handlers of the fake daemon; the tests read ``requests`` and the frames."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.containers: dict[str, dict[str, Any]] = {}
        self.pending_polls: dict[str, int] = {}
        self.polls_until_running = 2
        self.files: dict[tuple[str, str], bytes] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.override: Override | None = None
        self.events_linger = True
        self.terminal_frames: list[Any] = []
        self.terminal_queries: list[dict[str, str]] = []
        self.app = self._build()

    # -- helpers for tests --

    def add(self, name: str, status: str = "running", **extra: Any) -> dict[str, Any]:
        c = container(name, status, **extra)
        self.containers[name] = c
        return c

    def last(self) -> Seen:
        return self.requests[-1]

    def calls(self, method: str, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def inputs(self) -> str:
        return "".join(
            f["data"]
            for f in self.terminal_frames
            if isinstance(f, dict) and f.get("type") == "input"
        )

    def resizes(self) -> list[tuple[int, int]]:
        return [
            (f["cols"], f["rows"])
            for f in self.terminal_frames
            if isinstance(f, dict) and f.get("type") == "resize"
        ]

    # -- plumbing --

    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=200 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/api/version", self.version)
        r.add_get("/api/openapi.json", self.openapi)
        r.add_get("/api/containers", self.list)
        r.add_post("/api/containers", self.create)
        r.add_post("/api/containers/stream", self.create_stream)
        r.add_get("/api/containers/events", self.events)
        r.add_get("/api/containers/{id}", self.get)
        r.add_delete("/api/containers/{id}", self.delete)
        r.add_post("/api/containers/{id}/start", self.start)
        r.add_post("/api/containers/{id}/stop", self.stop)
        r.add_post("/api/containers/{id}/restart", self.restart)
        r.add_patch("/api/containers/{id}/settings", self.settings)
        r.add_post("/api/containers/{id}/exec", self.exec)
        r.add_get("/api/containers/{id}/stats", self.stats)
        r.add_post("/api/containers/{id}/files", self.upload)
        r.add_get("/api/containers/{id}/files", self.download)
        r.add_delete("/api/containers/{id}/files", self.delete_file)
        r.add_get("/api/containers/{id}/files/list", self.list_files)
        r.add_post("/api/containers/{id}/files/mkdir", self.mkdir)
        r.add_get("/api/images", self.images)
        r.add_post("/api/images/import", self.import_image)
        r.add_get("/api/roles", self.roles)
        r.add_get("/api/tokens/validate", self.validate_token)
        r.add_get("/api/tokens", self.list_tokens)
        r.add_post("/api/tokens", self.create_token)
        r.add_delete("/api/tokens/{id}", self.revoke_token)
        r.add_get("/ws/terminal/{id}", self.terminal)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        seen = Seen(
            request.method,
            request.path,
            dict(request.query),
            {k: v for k, v in request.headers.items()},
        )
        if request.can_read_body and not request.content_type.startswith("multipart/"):
            seen.raw = await request.read()
            if request.content_type == "application/json":
                seen.body = json.loads(seen.raw)
        self.requests.append(seen)
        if self.override is not None:
            o, self.override = self.override, None
            if o.text is not None:
                return web.Response(status=o.status, text=o.text, headers=o.headers)
            return web.json_response(o.body, status=o.status, headers=o.headers)
        if request.path != "/health" and not self._authorized(request):
            if "Authorization" not in request.headers:
                return _error(401, "Authorization token required")
            return _error(401, "Invalid or expired API token")
        try:
            response = await handler(request)
        except _Refusal as e:
            response = e.response
        if not response.prepared:
            response.headers["X-RateLimit-Limit"] = "120"
            response.headers["X-RateLimit-Remaining"] = "119"
        return response  # type: ignore[no-any-return]

    def _authorized(self, request: web.Request) -> bool:
        if request.path.startswith(WS_PATHS):
            # The WebSocket routes are checked on the subprotocol token alone, so the
            # tests prove the client sends it.
            offered = [
                p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            ]
            return f"rexec.token.{TOKEN}" in offered
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _find(self, request: web.Request) -> dict[str, Any]:
        key = request.match_info["id"]
        for c in self.containers.values():
            if key in (c["id"], c["db_id"], c["name"]):
                return c
        raise _Refusal(_error(404, "container not found", code="container_not_found"))

    def _running(self, c: dict[str, Any]) -> None:
        if c["status"] != "running":
            raise _Refusal(_error(409, "container is not running", status=c["status"]))

    # -- daemon --

    async def health(self, request: web.Request) -> web.Response:
        running = sum(1 for c in self.containers.values() if c["status"] == "running")
        return web.json_response(
            {
                "status": "ok",
                "containers_total": len(self.containers),
                "containers_running": running,
                "cgroup": "v2",
                "version": "0.1.0",
            }
        )

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.1.0", "build": "test"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response({"openapi": "3.0.3", "paths": {}})

    # -- containers --

    async def list(self, request: web.Request) -> web.Response:
        items = [self._settle(c) for c in reversed(self.containers.values())]
        return web.json_response({"containers": items, "count": len(items), "limit": 5})

    def _settle(self, c: dict[str, Any]) -> dict[str, Any]:
        # A created container becomes running (or error) after a few reads.
        left = self.pending_polls.get(c["name"])
        if left is not None:
            if left <= 1:
                del self.pending_polls[c["name"]]
                if c["image"] == "broken":
                    c.update(status="error", error_message="image failed to start")
                else:
                    c["status"] = "running"
            else:
                self.pending_polls[c["name"]] = left - 1
        return c

    def _new(self, body: dict[str, Any]) -> dict[str, Any]:
        image = body.get("image")
        if image == "bogus":
            raise _Refusal(
                _error(400, "unsupported image type", supported_images=["ubuntu", "alpine"])
            )
        name = body.get("name") or "brave-otter-42"
        if name in self.containers:
            raise _Refusal(_error(409, "container with this name already exists", name=name))
        c = container(name, "creating", image=str(image))
        res = c["resources"]
        for key in ("memory_mb", "cpu_shares", "disk_mb"):
            if body.get(key):
                res[key] = body[key]
        self.containers[name] = c
        return c

    async def create(self, request: web.Request) -> web.Response:
        c = self._new(await request.json())
        self.pending_polls[c["name"]] = self.polls_until_running
        return web.json_response({**c, "async": True}, status=202)

    async def create_stream(self, request: web.Request) -> web.StreamResponse:
        c = self._new(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": the stream starts\n\n")
        stages = ["validating", "pulling", "creating", "starting", "configuring"]
        for i, stage in enumerate(stages):
            frame = {
                "stage": stage,
                "message": f"{stage}...",
                "progress": i * 20,
                "complete": False,
            }
            if c["image"] == "broken" and stage == "starting":
                frame["error"] = "image failed to start"
                c.update(status="error", error_message="image failed to start")
                await resp.write(f"event: progress\ndata: {json.dumps(frame)}\n\n".encode())
                return resp
            line = f"data: {json.dumps(frame)}\r\n\r\n".encode()
            # Split a frame across writes: the client must buffer partial events.
            await resp.write(line[:7])
            await resp.write(line[7:])
        c["status"] = "running"
        final = {
            "stage": "ready",
            "message": "ready",
            "progress": 100,
            "complete": True,
            "container_id": c["id"],
            "container": c,
        }
        # The last event has no closing blank line before the stream ends.
        await resp.write(f"data: {json.dumps(final)}\n".encode())
        return resp

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self._settle(self._find(request)))

    async def start(self, request: web.Request) -> web.Response:
        c = self._find(request)
        c["status"] = "running"
        return web.json_response(
            {"message": "container started", "id": c["id"], "name": c["name"], "status": "running"}
        )

    async def stop(self, request: web.Request) -> web.Response:
        c = self._find(request)
        c["status"] = "stopped"
        return web.json_response(
            {"message": "container stopped", "id": c["id"], "name": c["name"], "status": "stopped"}
        )

    async def restart(self, request: web.Request) -> web.Response:
        c = self._find(request)
        c["status"] = "running"
        return web.json_response(
            {
                "message": "container restarted",
                "id": c["id"],
                "name": c["name"],
                "status": "running",
            }
        )

    async def delete(self, request: web.Request) -> web.Response:
        c = self._find(request)
        del self.containers[c["name"]]
        return web.json_response(
            {"message": "container deleted", "id": c["id"], "db_id": c["db_id"], "name": c["name"]}
        )

    async def settings(self, request: web.Request) -> web.Response:
        c = self._find(request)
        body = await request.json()
        if body.get("name"):
            del self.containers[c["name"]]
            c["name"] = body["name"]
            self.containers[c["name"]] = c
        for key in ("memory_mb", "cpu_shares", "disk_mb"):
            if body.get(key):
                c["resources"][key] = body[key]
        restarted = bool(body.get("disk_mb"))
        return web.json_response(
            {"message": "settings updated", "restarted": restarted, "container": c}
        )

    async def exec(self, request: web.Request) -> web.Response:
        c = self._find(request)
        self._running(c)
        body = await request.json()
        argv = body["cmd"] if "cmd" in body else ["/bin/sh", "-c", body["command"]]
        if argv[0] == "sleep":
            return _error(504, "command timed out", stdout="partial\n", stderr="", exit_code=-1)
        stdout = " ".join(argv) + "\n"
        stderr = "to stderr\n" if "--stderr" in argv else ""
        code = int(argv[1]) if argv[0] == "exit" else 0
        return web.json_response(
            {
                "stdout": stdout,
                "stderr": stderr,
                "output": stdout + stderr,
                "exit_code": code,
                "duration_ms": 7,
                "truncated": False,
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        self._find(request)
        return web.json_response(
            {
                "cpu_percent": 12.5,
                "cpu_usage_usec": 1000,
                "memory": 64 * 1024 * 1024,
                "memory_limit": 512 * 1024 * 1024,
                "pids": 3,
                "disk_read": 4096,
                "disk_write": 8192,
                "disk_usage": 1024 * 1024,
                "disk_limit": 2048 * 1024 * 1024,
                "net_rx": 100,
                "net_tx": 200,
                "oom_kills": 0,
            }
        )

    # -- files --

    async def upload(self, request: web.Request) -> web.Response:
        c = self._find(request)
        self._running(c)
        form = await request.post()
        part = form["file"]
        assert isinstance(part, web.FileField)
        data = part.file.read()
        directory = request.query["path"]
        target = directory.rstrip("/") + "/" + part.filename
        self.files[(c["name"], target)] = data
        self.requests[-1].body = {"filename": part.filename, "size": len(data)}
        return web.json_response({"message": "file uploaded", "path": target, "size": len(data)})

    async def download(self, request: web.Request) -> web.Response:
        c = self._find(request)
        path = request.query["path"]
        data = self.files.get((c["name"], path))
        if data is None:
            return _error(404, "file not found")
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={"X-File-Size": str(len(data)), "X-File-Mode": "0644"},
        )

    async def list_files(self, request: web.Request) -> web.Response:
        c = self._find(request)
        directory = request.query.get("path", "/")
        files = [
            {
                "name": p.rsplit("/", 1)[1],
                "path": p,
                "size": len(d),
                "mode": "-rw-r--r--",
                "mod_time": STAMP,
                "is_dir": False,
            }
            for (owner, p), d in self.files.items()
            if owner == c["name"] and p.rsplit("/", 1)[0] == directory.rstrip("/")
        ]
        return web.json_response({"path": directory, "files": files, "count": len(files)})

    async def delete_file(self, request: web.Request) -> web.Response:
        c = self._find(request)
        self.files.pop((c["name"], request.query["path"]), None)
        return web.json_response({"message": "file deleted", "path": request.query["path"]})

    async def mkdir(self, request: web.Request) -> web.Response:
        self._find(request)
        return web.json_response({"message": "directory created", "path": request.query["path"]})

    # -- images, roles, tokens --

    async def images(self, request: web.Request) -> web.Response:
        images = [
            {
                "name": "ubuntu",
                "display_name": "Ubuntu 24.04",
                "description": "Ubuntu",
                "category": "linux",
                "tags": ["lts", "apt"],
                "popular": True,
                "available": True,
            },
            {
                "name": "alpine",
                "display_name": "Alpine 3.20",
                "description": "Alpine",
                "category": "linux",
                "tags": [],
                "popular": False,
                "available": False,
                "unknown_future_key": 1,
            },
        ]
        return web.json_response({"images": images, "count": 2})

    async def import_image(self, request: web.Request) -> web.Response:
        raw = self.requests[-1].raw
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        name = request.query.get("name", "imported:latest")
        return web.json_response(
            {"name": name, "digest": digest, "size": len(raw), "layers": 1}, status=201
        )

    async def roles(self, request: web.Request) -> web.Response:
        roles = [
            {
                "id": "python",
                "name": "Python",
                "description": "Python dev",
                "packages": ["py", "pip"],
            }
        ]
        return web.json_response({"roles": roles})

    def _token_out(self, t: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in t.items() if k != "token"}

    async def create_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        n = len(self.tokens) + 1
        token = {
            "id": f"tok-{n}",
            "name": body["name"],
            "token_prefix": "rexec_cd",
            "scopes": body.get("scopes") or ["read", "write"],
            "expires_at": "2025-05-01T12:00:00Z" if body.get("expires_in") else None,
            "created_at": STAMP,
            "token": "rexec_" + "cd" * 24,
        }
        self.tokens[token["id"]] = token
        return web.json_response(token, status=201)

    async def list_tokens(self, request: web.Request) -> web.Response:
        tokens = [self._token_out(t) for t in self.tokens.values()]
        return web.json_response({"tokens": tokens, "count": len(tokens)})

    async def revoke_token(self, request: web.Request) -> web.Response:
        token_id = request.match_info["id"]
        if self.tokens.pop(token_id, None) is None:
            return _error(404, "token not found")
        return web.json_response({"message": "token revoked", "id": token_id})

    async def validate_token(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "valid": True,
                "user_id": "user-1",
                "user_name": "alice",
                "tier": "free",
                "scopes": ["read", "write"],
                "token_id": "tok-0",
                "expires_at": None,
            }
        )

    # -- WebSockets --

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("rexec.v1",))
        await ws.prepare(request)
        await ws.send_json({"type": "list", "containers": list(self.containers.values())})
        await ws.send_json({"type": "mystery", "what": "a type this client does not know"})
        await ws.send_str("not json")
        c = container("web")
        await ws.send_json({"type": "started", "container": c, "timestamp": STAMP})
        if self.events_linger:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT and json.loads(msg.data).get("type") == "ping":
                    await ws.send_json({"type": "pong"})
                    break
        await ws.close()
        return ws

    async def terminal(self, request: web.Request) -> web.StreamResponse:
        c = self._find(request)
        if c["status"] != "running":
            return _error(
                400, "container is not running", code="container_stopped", status=c["status"]
            )
        self.terminal_queries.append(dict(request.query))
        ws = web.WebSocketResponse(protocols=("rexec.v1",))
        await ws.prepare(request)
        await ws.send_json({"type": "connected", "data": request.query.get("id", "default")})
        await ws.send_json({"type": "shell_ready"})
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                self.terminal_frames.append(msg.data)
                await ws.send_json({"type": "output", "data": msg.data.decode("latin-1")})
                continue
            if msg.type is not WSMsgType.TEXT:
                break
            try:
                frame = json.loads(msg.data)
            except ValueError:
                self.terminal_frames.append(msg.data)
                await ws.send_json({"type": "output", "data": msg.data})
                continue
            self.terminal_frames.append(frame)
            kind = frame.get("type")
            if kind == "input":
                data = frame.get("data", "")
                await ws.send_json({"type": "output", "data": data})
                if self.inputs().endswith("exit\r"):
                    await ws.send_json({"type": "output", "data": "\r\nbye\r\n"})
                    break
                if self.inputs().endswith("fail\r"):
                    await ws.send_json({"type": "error", "data": "shell crashed"})
                    break
            elif kind == "resize":
                await ws.send_json(
                    {"type": "output", "data": f"[resize {frame['cols']}x{frame['rows']}]"}
                )
            elif kind == "ping":
                await ws.send_json({"type": "pong"})
        await ws.close()
        return ws


@asynccontextmanager
async def serve(daemon: FakeDaemon, unix_path: Path | None = None) -> AsyncIterator[str]:
    """Serve the fake on TCP (aiohttp's TestServer) or on a unix socket; yields REXEC_HOST."""
    if unix_path is None:
        server = TestServer(daemon.app)
        await server.start_server()
        try:
            yield f"http://{server.host}:{server.port}"
        finally:
            await server.close()
        return
    runner = web.AppRunner(daemon.app)
    await runner.setup()
    await web.UnixSite(runner, str(unix_path)).start()
    try:
        yield f"unix:{unix_path}"
    finally:
        await runner.cleanup()


class ServerThread:
    """Runs :func:`serve` on an event loop in a thread, for blocking code under test."""

    def __init__(self, daemon: FakeDaemon, unix_path: Path | None = None) -> None:
        self.daemon = daemon
        self.unix_path = unix_path
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.host = ""
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self.daemon, self.unix_path) as host:
            self.host = host
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake daemon did not start")
        return self.host

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
