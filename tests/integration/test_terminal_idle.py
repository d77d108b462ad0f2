"""Integration: a terminal session nobody is attached to ends after
``terminal.idle_timeout_s``; an attached one never idles out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .daemon import Daemon
from .terminal_client import create_running, exec_sh, running_daemon, terminal

IDLE_S = 2


@dataclass
class Env:
    d: Daemon
    token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    overrides = {"terminal": {"idle_timeout_s": IDLE_S}}
    with running_daemon(tmp_path_factory.mktemp("terminal-idle"), overrides) as d:
        token = d.token("idler", tier="pro")
        create_running(d, token, "idle")
        yield Env(d, token)


def ptys(env: Env) -> list[str]:
    """The PTYs allocated in the container's devpts (a session's goes when it ends)."""
    out = exec_sh(env.d, env.token, "idle", "ls /dev/pts")
    return sorted(n for n in out.split() if n != "ptmx")


async def test_detached_session_ends_after_idle_timeout(env: Env) -> None:
    async with terminal(env.d, env.token, "idle", id="nap") as t:
        assert await t.run("MARK=idle-marker; echo set") == "set\r\n"
        pts = (await t.run("tty")).strip().removeprefix("/dev/pts/")
    detached = time.monotonic()
    assert pts in await asyncio.to_thread(ptys, env)
    # Poll until the session's PTY is gone: the shell was hung up, the master closed.
    deadline = detached + IDLE_S + 10
    while pts in await asyncio.to_thread(ptys, env):
        assert time.monotonic() < deadline, "the idle session was never ended"
        await asyncio.sleep(0.1)
    assert time.monotonic() - detached >= IDLE_S - 0.2, "ended before its idle timeout"
    async with terminal(env.d, env.token, "idle", id="nap") as t:
        assert (await t.ready())["data"] == "new"
        assert await t.run('echo "[$MARK]"') == "[]\r\n"
        assert "idle-marker" not in t.out


async def test_reconnect_within_timeout_resumes(env: Env) -> None:
    async with terminal(env.d, env.token, "idle", id="quick") as t:
        assert await t.run("MARK=kept; echo set") == "set\r\n"
    async with terminal(env.d, env.token, "idle", id="quick") as t:
        assert (await t.ready())["data"] == "resumed"
        assert await t.run('echo "[$MARK]"') == "[kept]\r\n"
        # Attached for longer than the idle timeout: the session stays.
        deadline = time.monotonic() + IDLE_S * 2
        while time.monotonic() < deadline:
            assert await t.run("echo tick") == "tick\r\n"
            await asyncio.sleep(0.5)
        assert await t.run('echo "[$MARK]"') == "[kept]\r\n"
    async with terminal(env.d, env.token, "idle", id="quick") as t:
        assert (await t.ready())["data"] == "resumed"


async def test_idle_session_with_a_busy_foreground_job_ends_too(env: Env) -> None:
    """A foreground job that ignores SIGHUP must not keep an idle session alive."""
    async with terminal(env.d, env.token, "idle", id="busy") as t:
        pts = (await t.run("tty")).strip().removeprefix("/dev/pts/")
        await t.send("sh -c 'trap \"\" HUP; while :; do sleep 1; done'\r")
        await t.expect("while")
    deadline = time.monotonic() + IDLE_S + 15
    while pts in await asyncio.to_thread(ptys, env):
        assert time.monotonic() < deadline, "the idle session was never ended"
        await asyncio.sleep(0.1)
    async with terminal(env.d, env.token, "idle", id="busy") as t:
        assert (await t.ready())["data"] == "new"
    await asyncio.to_thread(exec_sh, env.d, env.token, "idle", "pkill -f 'HU[P]'")
