"""The blocking Client: same calls, results and errors as AsyncClient, from plain code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexecd.client import ApiError, Client, TransportError
from rexecd.models import ContainerOut, TerminalFrame
from tests.deadlines import scaled
from tests.unit.fakes.daemon import TOKEN, FakeDaemon, ServerThread


@pytest.fixture(params=["tcp", "unix"])
def daemon_host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FakeDaemon, str]]:
    daemon = FakeDaemon()
    unix_path = tmp_path / "d.sock" if request.param == "unix" else None
    with ServerThread(daemon, unix_path) as host:
        yield daemon, host


def test_calls_and_results(daemon_host: tuple[FakeDaemon, str]) -> None:
    daemon, host = daemon_host
    with Client(host, TOKEN) as client:
        assert client.host == host and client.token == TOKEN
        created = client.create("ubuntu", name="web", memory_mb=256, wait=True, poll_interval=0.01)
        assert isinstance(created, ContainerOut) and created.status == "running"
        assert daemon.calls("POST", "/api/containers")[0].body == {
            "image": "ubuntu",
            "name": "web",
            "memory_mb": 256,
        }
        assert [c.name for c in client.list_containers().containers] == ["web"]
        assert client.rate_limit == (120, 119)
        assert client.stop("web", timeout=3).status == "stopped"
        assert daemon.last().query == {"timeout": "3"}
        assert client.start("web").status == "running"
        result = client.exec("web", ["exit", "4"])
        assert result.exit_code == 4
        client.upload_file("web", "/tmp", b"abc", filename="f")
        assert client.download_file("web", "/tmp/f") == b"abc"
        assert client.health().status == "ok"
        assert client.validate_token().user_name == "alice"
        assert client.delete("web", volumes=True).name == "web"
        assert daemon.last().query == {"volumes": "true"}


def test_errors_cross_the_thread(daemon_host: tuple[FakeDaemon, str]) -> None:
    _, host = daemon_host
    with Client(host, TOKEN) as client:
        with pytest.raises(ApiError) as info:
            client.get("ghost")
        assert (info.value.status, info.value.message) == (404, "container not found")
        with pytest.raises(ApiError) as info:
            client.terminal("ghost")
        assert info.value.code == "container_not_found"


def test_create_stream_iterates(daemon_host: tuple[FakeDaemon, str]) -> None:
    _, host = daemon_host
    with Client(host, TOKEN) as client:
        stages = [f.stage for f in client.create_stream("ubuntu", name="web")]
        assert stages[0] == "validating" and stages[-1] == "ready"
        # Leaving a stream early closes it; the client stays usable.
        stream = client.create_stream("ubuntu", name="web2")
        assert next(stream).stage == "validating"
        stream.close()
        assert client.get("web2").name == "web2"


def test_events_and_terminal(daemon_host: tuple[FakeDaemon, str]) -> None:
    daemon, host = daemon_host
    daemon.add("web")
    with Client(host, TOKEN) as client:
        with client.events() as events:
            it = iter(events)
            assert next(it).type == "list"
            assert next(it).type == "started"
            events.ping()
            assert next(it).type == "pong"
            assert list(it) == []

        with client.terminal("web", session="s2") as term:
            assert term.protocol == "rexec.v1"
            assert term.receive(timeout=scaled(5)) == TerminalFrame(type="connected", data="s2")
            assert term.receive(timeout=scaled(5)) == TerminalFrame(type="shell_ready")
            term.resize(90, 20)
            assert term.receive(timeout=scaled(5)) == TerminalFrame(
                type="output", data="[resize 90x20]"
            )
            term.send_input("exit\r")
            assert [f.data for f in term] == ["exit\r", "\r\nbye\r\n"]
            assert term.closed
        assert daemon.resizes() == [(90, 20)]


def test_usable_from_inside_a_running_loop(daemon_host: tuple[FakeDaemon, str]) -> None:
    _, host = daemon_host

    async def inside() -> str:
        with Client(host, TOKEN) as client:
            return client.version().version

    assert asyncio.run(inside()) == "0.1.0"


def test_close_stops_the_thread_and_refuses_calls(daemon_host: tuple[FakeDaemon, str]) -> None:
    _, host = daemon_host
    before = threading.active_count()
    client = Client(host, TOKEN)
    client.version()
    client.close()
    client.close()  # idempotent
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="closed"):
        client.version()


def test_transport_error(tmp_path: Path) -> None:
    with Client(f"unix:{tmp_path}/absent.sock", TOKEN) as client, pytest.raises(TransportError):
        client.list_containers()
