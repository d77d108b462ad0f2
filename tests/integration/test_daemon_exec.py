"""``POST /containers/{id}/exec`` on a real daemon: both request forms, exit codes,
stderr, env, workdir, user, the timeout (504 with partial output), the 1 MiB cap."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, MiB, running_daemon, unique


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


@pytest.fixture(scope="module")
def user_token(daemon: Daemon) -> str:
    return daemon.token(unique("exec"))


@pytest.fixture
async def box(daemon: Daemon, user_token: str) -> AsyncIterator[tuple[ApiClient, str]]:
    """A running container (and a client of its owner), deleted afterwards."""
    name = unique("ex")
    async with ApiClient(daemon, user_token) as c:
        try:
            await c.create_running(name, environment={"FROM_CREATE": "yes", "FOO": "create"})
            yield c, name
        finally:
            await c.remove(name)


async def test_command_form_reports_stdout_stderr_and_exit_code(
    box: tuple[ApiClient, str],
) -> None:
    c, name = box
    r = (await c.exec(name, "echo out; echo err >&2; exit 3")).expect(200)
    assert set(r.body) == {"stdout", "stderr", "output", "exit_code", "duration_ms", "truncated"}
    assert r["stdout"] == "out\n" and r["stderr"] == "err\n"
    assert sorted(r["output"].splitlines()) == ["err", "out"]
    assert r["exit_code"] == 3 and r["truncated"] is False
    assert isinstance(r["duration_ms"], int) and r["duration_ms"] >= 0
    # sh -c semantics: pipes, variables, the image's PATH and the default cwd (home).
    r = (await c.exec(name, 'x=$(echo a | tr a b); echo "$x $PWD $FROM_CREATE"')).expect(200)
    assert r["stdout"] == "b /home/user yes\n" and r["exit_code"] == 0
    # stdin is empty: a reader of stdin does not hang.
    assert (await c.exec(name, "cat; echo done")).expect(200)["stdout"] == "done\n"


async def test_cmd_form_with_env_workdir_and_user(box: tuple[ApiClient, str]) -> None:
    c, name = box
    r = (await c.exec(name, cmd=["printf", "%s|", "a b", "$HOME", "c"])).expect(200)
    assert r["stdout"] == "a b|$HOME|c|", "argv is passed as is, no shell"
    r = (
        await c.exec(
            name,
            cmd=["sh", "-c", 'echo "$FOO $BAR"; pwd; id -u; id -g'],
            env=["FOO=request", "BAR=two words"],
            workdir="/tmp",
            user="user",
        )
    ).expect(200)
    assert r["stdout"].splitlines() == ["request two words", "/tmp", "1000", "1000"], r.body
    r = (await c.exec(name, "id -u; id -g", user="0")).expect(200)
    assert r["stdout"] == "0\n0\n"
    r = (await c.exec(name, "id -u", user="1000:1000")).expect(200)
    assert r["stdout"] == "1000\n"
    # A file the unprivileged user makes is theirs.
    await c.sh(name, "chmod 1777 /tmp")
    r = (await c.exec(name, "touch /tmp/mine && stat -c %u /tmp/mine", user="user")).expect(200)
    assert r["stdout"] == "1000\n"


async def test_missing_program_and_bad_workdir(box: tuple[ApiClient, str]) -> None:
    c, name = box
    r = (await c.exec(name, cmd=["/no/such/program"])).expect(200)
    assert r["exit_code"] == 127 and "/no/such/program" in r["stderr"]
    r = (await c.exec(name, cmd=["/etc/passwd"])).expect(200)
    assert r["exit_code"] == 126
    # A workdir that does not exist is the caller's mistake, not a server fault.
    r = (await c.exec(name, "exit 0", workdir="/does/not/exist")).expect(400)
    assert "/does/not/exist" in r["error"]
    r = (await c.exec(name, "exit 0", user="nosuchuser")).expect(400)
    assert "nosuchuser" in r["error"]


async def test_timeout_answers_504_with_partial_output(box: tuple[ApiClient, str]) -> None:
    c, name = box
    started = time.monotonic()
    r = (
        await c.exec(name, "echo partial; echo warn >&2; sleep 30; echo never", timeout_seconds=1)
    ).expect(504)
    assert time.monotonic() - started < 10
    assert r["stdout"] == "partial\n"
    assert "warn" in r["stderr"] and "never" not in r["output"]
    assert r["exit_code"] != 0
    # The timed-out command is gone, children included.
    ps = await c.sh(name, "ps -o args")
    assert "sleep 30" not in ps, ps


async def test_output_is_capped_at_one_mib(box: tuple[ApiClient, str]) -> None:
    c, name = box
    r = (await c.exec(name, "head -c 3000000 /dev/zero | tr '\\0' a; echo tail")).expect(200)
    assert r["truncated"] is True
    assert r["exit_code"] == 0
    assert len(r["stdout"]) + len(r["stderr"]) <= MiB
    assert len(r["stdout"]) == MiB and set(r["stdout"]) == {"a"}
    r = (await c.exec(name, "head -c 1000 /dev/zero | tr '\\0' b")).expect(200)
    assert r["truncated"] is False and len(r["stdout"]) == 1000


async def test_background_child_holding_stdout_does_not_hang(box: tuple[ApiClient, str]) -> None:
    c, name = box
    started = time.monotonic()
    r = (await c.exec(name, "sleep 60 & echo bg")).expect(200)
    assert r["stdout"] == "bg\n" and r["exit_code"] == 0
    assert time.monotonic() - started < 10


async def test_exec_over_unix_socket(daemon: Daemon, box: tuple[ApiClient, str]) -> None:
    c, name = box
    async with ApiClient(daemon, c.token, "unix") as u:
        assert await u.sh(name, "echo via-socket") == "via-socket\n"


async def test_exec_in_stopped_container_is_409(box: tuple[ApiClient, str]) -> None:
    c, name = box
    (await c.post(f"/api/containers/{name}/stop")).expect(200)
    r = (await c.exec(name, "true")).expect(409)
    assert r["error"] and r.body.get("status") == "stopped"
    (await c.post(f"/api/containers/{name}/start")).expect(200)
    assert await c.sh(name, "echo up") == "up\n"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"command": "true", "cmd": ["true"]},
        {"cmd": []},
        {"command": "true", "workdir": "relative"},
        {"command": "true", "env": ["NOEQUALS"]},
        {"command": "true", "timeout_seconds": -1},
        {"command": "true", "unknown": 1},
    ],
)
async def test_invalid_exec_body_is_400_with_details(
    box: tuple[ApiClient, str], body: dict[str, object]
) -> None:
    c, name = box
    r = (await c.post(f"/api/containers/{name}/exec", body)).expect(400)
    assert r["error"] and r.body.get("details")
