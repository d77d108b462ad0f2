"""AsyncClient against the fake daemon, over TCP and a unix socket: requests and parsing."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rexecd.client import (
    ApiError,
    AsyncClient,
    ProtocolError,
    TransportError,
    parse_host,
)
from rexecd.client.sdk import DEFAULT_HOST
from rexecd.models import TerminalFrame
from tests.unit.fakes.daemon import TOKEN, FakeDaemon, Override, container, serve

Served = tuple[FakeDaemon, AsyncClient]


@pytest.fixture(params=["tcp", "unix"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    daemon = FakeDaemon()
    daemon.polls_until_running = 2
    unix_path = tmp_path / "d.sock" if request.param == "unix" else None
    async with serve(daemon, unix_path) as host, AsyncClient(host, TOKEN) as client:
        yield daemon, client


def test_parse_host() -> None:
    assert parse_host("unix:/run/rexecd/rexecd.sock") == (
        "http://localhost",
        "/run/rexecd/rexecd.sock",
    )
    assert parse_host("unix:///tmp/x.sock") == ("http://localhost", "/tmp/x.sock")
    assert parse_host("/tmp/x.sock") == ("http://localhost", "/tmp/x.sock")
    assert parse_host("http://10.0.0.1:8080/") == ("http://10.0.0.1:8080", None)
    assert parse_host("https://rexec.example/api-proxy") == (
        "https://rexec.example/api-proxy",
        None,
    )
    assert parse_host("tcp:127.0.0.1:9000") == ("http://127.0.0.1:9000", None)
    for bad in ("ftp://x", "unix:", "localhost:80"):
        with pytest.raises(ValueError):
            parse_host(bad)


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REXEC_HOST", raising=False)
    monkeypatch.delenv("REXEC_TOKEN", raising=False)
    c = AsyncClient()
    assert (c.host, c.token) == (DEFAULT_HOST, None)
    monkeypatch.setenv("REXEC_HOST", "http://h:1")
    monkeypatch.setenv("REXEC_TOKEN", "rexec_env")
    c = AsyncClient()
    assert (c.host, c.token) == ("http://h:1", "rexec_env")
    c = AsyncClient("unix:/x.sock", "rexec_arg")
    assert (c.host, c.token) == ("unix:/x.sock", "rexec_arg")


async def test_list_and_get(served: Served) -> None:
    daemon, client = served
    daemon.add("one")
    daemon.add("two", status="stopped")
    listing = await client.list_containers()
    seen = daemon.last()
    assert (seen.method, seen.path) == ("GET", "/api/containers")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert [c.name for c in listing.containers] == ["two", "one"]
    assert (listing.count, listing.limit) == (2, 5)
    assert client.rate_limit == (120, 119)

    two = daemon.containers["two"]
    for key in (two["name"], two["id"], two["db_id"]):
        got = await client.get(key)
        assert got.name == "two" and got.status == "stopped"
        assert daemon.last().path == f"/api/containers/{key}"
    assert got.resources.memory_mb == 512
    assert got.created_at.year == 2024


async def test_create_sends_only_given_fields(served: Served) -> None:
    daemon, client = served
    created = await client.create(
        "ubuntu",
        name="web",
        memory_mb=1024,
        cpu_shares=1500,
        disk_mb=4096,
        environment={"A": "1"},
        labels={"team": "x"},
        role="python",
    )
    seen = daemon.last()
    assert (seen.method, seen.path) == ("POST", "/api/containers")
    assert seen.body == {
        "image": "ubuntu",
        "name": "web",
        "role": "python",
        "memory_mb": 1024,
        "cpu_shares": 1500,
        "disk_mb": 4096,
        "environment": {"A": "1"},
        "labels": {"team": "x"},
    }
    assert created.status == "creating"
    assert created.async_ is True
    assert created.resources.cpu_shares == 1500

    await client.create("alpine")
    assert daemon.last().body == {"image": "alpine"}


async def test_create_wait_polls_until_running(served: Served) -> None:
    daemon, client = served
    daemon.polls_until_running = 3
    c = await client.create("ubuntu", name="web", wait=True, poll_interval=0.01)
    assert c.status == "running"
    assert len(daemon.calls("GET", f"/api/containers/{c.id}")) == 3


async def test_create_wait_stops_at_error(served: Served) -> None:
    _, client = served
    c = await client.create("broken", name="bad", wait=True, poll_interval=0.01)
    assert c.status == "error"
    assert c.error_message == "image failed to start"


async def test_create_wait_deadline(served: Served) -> None:
    daemon, client = served
    daemon.polls_until_running = 10_000
    with pytest.raises(TimeoutError, match="still creating"):
        await client.create("ubuntu", wait=True, wait_timeout=0.2, poll_interval=0.02)


async def test_wait_for_rides_out_rate_limit(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    daemon.override = Override(429, {"error": "rate limit exceeded", "retry_after": 0.05})
    c = await client.wait_for("web", interval=0.01, timeout=5)
    assert c.status == "running"
    assert len(daemon.calls("GET", "/api/containers/web")) == 2


async def test_create_stream(served: Served) -> None:
    daemon, client = served
    frames = [f async for f in client.create_stream("ubuntu", name="web", memory_mb=256)]
    seen = daemon.calls("POST", "/api/containers/stream")[0]
    assert seen.body == {"image": "ubuntu", "name": "web", "memory_mb": 256}
    assert seen.headers["Accept"] == "text/event-stream"
    assert [f.stage for f in frames] == [
        "validating",
        "pulling",
        "creating",
        "starting",
        "configuring",
        "ready",
    ]
    assert [f.progress for f in frames] == [0, 20, 40, 60, 80, 100]
    last = frames[-1]
    assert last.complete and last.container is not None
    assert last.container.name == "web" and last.container_id == last.container.id


async def test_create_stream_error_frame_and_refusal(served: Served) -> None:
    _, client = served
    frames = [f async for f in client.create_stream("broken", name="bad")]
    assert frames[-1].stage == "starting"
    assert frames[-1].error == "image failed to start"
    with pytest.raises(ApiError) as info:
        async for _ in client.create_stream("bogus"):
            pass
    assert info.value.status == 400
    assert info.value.body["supported_images"] == ["ubuntu", "alpine"]


async def test_actions(served: Served) -> None:
    daemon, client = served
    web = daemon.add("web", status="stopped")
    started = await client.start("web")
    assert (daemon.last().method, daemon.last().path) == ("POST", "/api/containers/web/start")
    assert (started.status, started.id, started.message) == (
        "running",
        web["id"],
        "container started",
    )

    stopped = await client.stop("web", timeout=5)
    assert daemon.last().path == "/api/containers/web/stop"
    assert daemon.last().query == {"timeout": "5"}
    assert stopped.status == "stopped"
    await client.stop("web", timeout=2.5)
    assert daemon.last().query == {"timeout": "2.5"}
    await client.stop("web")
    assert daemon.last().query == {}

    restarted = await client.restart("web")
    assert daemon.last().path == "/api/containers/web/restart"
    assert restarted.status == "running"

    deleted = await client.delete("web", volumes=True)
    seen = daemon.last()
    assert (seen.method, seen.path, seen.query) == (
        "DELETE",
        "/api/containers/web",
        {"volumes": "true"},
    )
    assert (deleted.name, deleted.db_id) == ("web", web["db_id"])
    daemon.add("web")
    await client.delete("web")
    assert daemon.last().query == {}


async def test_update_settings(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    result = await client.update_settings("web", memory_mb=1024, name="web2")
    seen = daemon.last()
    assert (seen.method, seen.path) == ("PATCH", "/api/containers/web/settings")
    assert seen.body == {"name": "web2", "memory_mb": 1024}
    assert result.message == "settings updated" and result.restarted is False
    assert result.container.name == "web2" and result.container.resources.memory_mb == 1024


async def test_exec_request_shapes(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    r = await client.exec("web", "echo hi")
    assert daemon.last().path == "/api/containers/web/exec"
    assert daemon.last().body == {"command": "echo hi"}
    assert r.stdout == "/bin/sh -c echo hi\n" and r.exit_code == 0

    r = await client.exec(
        "web",
        ["ls", "--stderr"],
        workdir="/tmp",
        env={"A": "1", "B": "x=y"},
        user="root",
        timeout_seconds=5,
    )
    assert daemon.last().body == {
        "cmd": ["ls", "--stderr"],
        "workdir": "/tmp",
        "env": ["A=1", "B=x=y"],
        "user": "root",
        "timeout_seconds": 5,
    }
    assert (r.stdout, r.stderr, r.duration_ms, r.truncated) == (
        "ls --stderr\n",
        "to stderr\n",
        7,
        False,
    )

    await client.exec("web", ("env",), env=["C=3"])
    assert daemon.last().body == {"cmd": ["env"], "env": ["C=3"]}

    r = await client.exec("web", ["exit", "3"])
    assert r.exit_code == 3


async def test_exec_timeout_and_conflict(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    with pytest.raises(ApiError) as info:
        await client.exec("web", ["sleep", "999"])
    assert info.value.status == 504
    assert info.value.body["stdout"] == "partial\n"
    daemon.add("off", status="stopped")
    with pytest.raises(ApiError) as info:
        await client.exec("off", "true")
    assert info.value.status == 409 and info.value.message == "container is not running"


async def test_stats(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    s = await client.stats("web")
    assert daemon.last().path == "/api/containers/web/stats"
    assert s.cpu_percent == 12.5 and s.pids == 3 and s.memory_limit == 512 * 1024 * 1024


async def test_files(served: Served, tmp_path: Path) -> None:
    daemon, client = served
    daemon.add("web")
    answer = await client.upload_file("web", "/home/user", b"\x00binary\xff", filename="a.bin")
    seen = daemon.last()
    assert (seen.method, seen.path, seen.query) == (
        "POST",
        "/api/containers/web/files",
        {"path": "/home/user"},
    )
    assert seen.headers["Content-Type"].startswith("multipart/form-data")
    assert seen.body == {"filename": "a.bin", "size": 8}
    assert answer["path"] == "/home/user/a.bin"

    local = tmp_path / "notes.txt"
    local.write_text("hello")
    await client.upload_file("web", "/home/user", local)
    assert daemon.files[("web", "/home/user/notes.txt")] == b"hello"
    with local.open("rb") as f:
        await client.upload_file("web", "/tmp", f)
    assert daemon.files[("web", "/tmp/notes.txt")] == b"hello"
    with pytest.raises(ValueError):
        await client.upload_file("web", "/tmp", b"no name")

    data = await client.download_file("web", "/home/user/a.bin")
    assert daemon.last().query == {"path": "/home/user/a.bin"}
    assert data == b"\x00binary\xff"

    listing = await client.list_files("web", "/home/user")
    assert (daemon.last().path, daemon.last().query) == (
        "/api/containers/web/files/list",
        {"path": "/home/user"},
    )
    assert sorted(f.name for f in listing.files) == ["a.bin", "notes.txt"]
    assert listing.count == 2 and not listing.files[0].is_dir

    deleted = await client.delete_file("web", "/home/user/a.bin")
    assert (daemon.last().method, daemon.last().query) == ("DELETE", {"path": "/home/user/a.bin"})
    assert deleted["message"] == "file deleted"
    made = await client.mkdir("web", "/home/user/new")
    assert (daemon.last().path, daemon.last().query) == (
        "/api/containers/web/files/mkdir",
        {"path": "/home/user/new"},
    )
    assert made["path"] == "/home/user/new"

    with pytest.raises(ApiError) as info:
        await client.download_file("web", "/home/user/a.bin")
    assert info.value.status == 404 and info.value.message == "file not found"


async def test_images_roles_import(served: Served, tmp_path: Path) -> None:
    daemon, client = served
    images = await client.images()
    assert daemon.last().path == "/api/images"
    assert [i.name for i in images.images] == ["ubuntu", "alpine"]
    assert images.images[0].tags == ["lts", "apt"]
    roles = await client.roles()
    assert roles.roles[0].packages == ["py", "pip"]

    tarball = tmp_path / "img.tar"
    payload = b"tar" * 100_000
    tarball.write_bytes(payload)
    result = await client.import_image(tarball, name="mine:1")
    seen = daemon.last()
    assert (seen.method, seen.path, seen.query) == (
        "POST",
        "/api/images/import",
        {"name": "mine:1"},
    )
    assert seen.headers["Content-Type"] == "application/x-tar"
    assert seen.raw == payload
    assert result.digest == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert (result.name, result.size, result.layers) == ("mine:1", len(payload), 1)


async def test_tokens(served: Served) -> None:
    daemon, client = served
    created = await client.create_token("ci", scopes=["read"], expires_in=30)
    seen = daemon.last()
    assert (seen.method, seen.path) == ("POST", "/api/tokens")
    assert seen.body == {"name": "ci", "scopes": ["read"], "expires_in": 30}
    assert created.token.startswith("rexec_") and created.scopes == ["read"]
    assert created.expires_at is not None

    await client.create_token("plain")
    assert daemon.last().body == {"name": "plain"}

    listing = await client.list_tokens()
    assert [t.name for t in listing.tokens] == ["ci", "plain"]
    revoked = await client.revoke_token("tok-1")
    assert (daemon.last().method, daemon.last().path) == ("DELETE", "/api/tokens/tok-1")
    assert revoked["message"] == "token revoked"
    who = await client.validate_token()
    assert daemon.last().path == "/api/tokens/validate"
    assert (who.user_name, who.tier, who.valid) == ("alice", "free", True)


async def test_daemon_endpoints(served: Served) -> None:
    daemon, client = served
    health = await client.health()
    assert daemon.last().path == "/health"
    assert (health.status, health.cgroup) == ("ok", "v2")
    version = await client.version()
    assert (version.version, version.build) == ("0.1.0", "test")
    doc = await client.openapi()
    assert doc["openapi"].startswith("3.")


async def test_error_mapping(served: Served) -> None:
    daemon, client = served
    with pytest.raises(ApiError) as info:
        await client.get("ghost")
    e = info.value
    assert (e.status, e.message, e.code) == (404, "container not found", "container_not_found")
    assert e.body == {"error": "container not found", "code": "container_not_found"}
    assert str(e) == "container not found (404)"
    assert e.retry_after is None

    daemon.override = Override(
        429, {"error": "rate limit exceeded", "retry_after": 12}, {"Retry-After": "12"}
    )
    with pytest.raises(ApiError) as info:
        await client.list_containers()
    assert (info.value.status, info.value.retry_after) == (429, 12.0)

    # Only the header: the client still finds the delay.
    daemon.override = Override(429, {"error": "rate limit exceeded"}, {"Retry-After": "3"})
    with pytest.raises(ApiError) as info:
        await client.list_containers()
    assert info.value.retry_after == 3.0

    daemon.override = Override(
        403, {"error": "container limit reached", "current": 5, "limit": 5, "tier": "free"}
    )
    with pytest.raises(ApiError) as info:
        await client.create("ubuntu")
    assert info.value.body["tier"] == "free"

    daemon.add("web")
    with pytest.raises(ApiError) as info:
        await client.create("ubuntu", name="web")
    assert info.value.status == 409 and info.value.body["name"] == "web"

    # A proxy's plain-text error still becomes an ApiError with a readable message.
    daemon.override = Override(502, None, text="Bad Gateway")
    with pytest.raises(ApiError) as info:
        await client.list_containers()
    assert (info.value.status, info.value.message) == (502, "Bad Gateway")

    # A body that is not the documented shape is a ProtocolError, not a crash.
    daemon.override = Override(200, {"containers": "nope"})
    with pytest.raises(ProtocolError):
        await client.list_containers()


async def test_missing_and_wrong_token(served: Served) -> None:
    daemon, client = served
    anonymous = AsyncClient(client.host, "")
    async with anonymous:
        assert anonymous.token is None
        with pytest.raises(ApiError) as info:
            await anonymous.list_containers()
        assert info.value.status == 401 and info.value.message == "Authorization token required"
        assert "Authorization" not in daemon.last().headers
        assert (await anonymous.health()).status == "ok"
    async with AsyncClient(client.host, "rexec_wrong") as wrong:
        with pytest.raises(ApiError, match=r"Invalid or expired API token \(401\)"):
            await wrong.list_containers()


async def test_unreachable_daemon(tmp_path: Path) -> None:
    async with AsyncClient(f"unix:{tmp_path}/absent.sock", TOKEN) as client:
        with pytest.raises(TransportError, match="cannot reach the daemon at unix:"):
            await client.list_containers()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncClient(f"http://127.0.0.1:{port}", TOKEN) as client:
        with pytest.raises(TransportError, match="cannot reach"):
            await client.version()


async def test_events(served: Served) -> None:
    daemon, client = served
    daemon.add("one")
    async with client.events() as stream:
        first = await stream.__anext__()
        assert first.type == "list"
        assert [c.name for c in first.containers or []] == ["one"]
        # The unknown type and the non-JSON frame are skipped.
        second = await stream.__anext__()
        assert second.type == "started"
        assert second.container is not None and second.container.name == "web"
        assert second.timestamp is not None
        await stream.ping()
        pong = await stream.__anext__()
        assert pong.type == "pong"
        rest = [e async for e in stream]
        assert rest == []
    seen = daemon.calls("GET", "/api/containers/events")[0]
    assert seen.headers["Sec-WebSocket-Protocol"] == f"rexec.v1,rexec.token.{TOKEN}"


async def test_terminal_session(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    async with client.terminal("web", session="s1", new_session=True) as term:
        assert term.protocol == "rexec.v1"
        assert daemon.terminal_queries == [{"id": "s1", "newSession": "true"}]
        connected = await term.receive()
        assert connected == TerminalFrame(type="connected", data="s1")
        assert (await term.receive()) == TerminalFrame(type="shell_ready")

        await term.send_input("ls\r")
        assert await term.receive() == TerminalFrame(type="output", data="ls\r")
        await term.resize(120, 40)
        assert await term.receive() == TerminalFrame(type="output", data="[resize 120x40]")
        await term.ping()
        assert await term.receive() == TerminalFrame(type="pong")
        await term.send_raw(b"\xff\xfe")
        assert await term.receive() == TerminalFrame(type="output", data="\xff\xfe")
        await term.send_input("exit\r")
        frames = [f async for f in term]
        assert [f.data for f in frames] == ["exit\r", "\r\nbye\r\n"]
        assert term.closed
        assert await term.receive() is None
    assert daemon.terminal_frames[:3] == [
        {"type": "input", "data": "ls\r"},
        {"type": "resize", "cols": 120, "rows": 40},
        {"type": "ping"},
    ]
    seen = daemon.calls("GET", "/ws/terminal/web")[0]
    assert seen.headers["Sec-WebSocket-Protocol"] == f"rexec.v1,rexec.token.{TOKEN}"


async def test_terminal_default_session_query(served: Served) -> None:
    daemon, client = served
    daemon.add("web")
    async with client.terminal("web") as term:
        assert (await term.receive()) == TerminalFrame(type="connected", data="default")
    assert daemon.terminal_queries == [{}]


async def test_terminal_refusals_carry_the_body(served: Served) -> None:
    daemon, client = served
    with pytest.raises(ApiError) as info:
        await client.terminal("ghost").connect()
    assert (info.value.status, info.value.code) == (404, "container_not_found")
    assert str(info.value) == "container not found (404)"
    daemon.add("off", status="stopped")
    with pytest.raises(ApiError) as info:
        await client.terminal("off").connect()
    assert info.value.status == 400
    assert info.value.body == {
        "error": "container is not running",
        "code": "container_stopped",
        "status": "stopped",
    }
    # Without the subprotocol token the upgrade is refused with 401.
    async with AsyncClient(client.host, "rexec_wrong") as wrong:
        with pytest.raises(ApiError) as info:
            await wrong.terminal("off").connect()
        assert info.value.status == 401


def test_container_fixture_parses() -> None:
    from rexecd.models import ContainerOut

    assert ContainerOut.model_validate(container("x")).name == "x"


def test_client_imports_nothing_of_the_daemon() -> None:
    # The SDK and CLI must run on a machine that only talks to a remote daemon.
    import subprocess
    import sys

    probe = (
        "import sys, rexecd.client, rexecd.client.cli;"
        "print([m for m in sys.modules if m.startswith(('rexecd.service', 'rexecd.runtime',"
        " 'rexecd.api', 'rexecd._native'))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.strip() == "[]"


def test_the_fake_daemon_refuses_a_missing_token() -> None:
    """The fake itself enforces auth, so client tests that pass prove the header is sent."""

    async def check() -> tuple[int, int]:
        import aiohttp

        daemon = FakeDaemon()
        async with serve(daemon) as host, aiohttp.ClientSession() as s:
            async with s.get(host + "/api/containers") as r1:
                unauth = r1.status
            async with s.get(host + "/health") as r2:
                health = r2.status
        return unauth, health

    assert asyncio.run(check()) == (401, 200)
