"""A container that replaces its /dev/ptmx (a FIFO, a regular file, a symlink to a
FIFO) cannot hang or mislead a terminal open: the PTY comes from the container's own
devpts instance (/dev/pts/ptmx, checked to be a devpts character device) and the
daemon's wait for the child's handshake is bounded. The daemon stays responsive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .daemon import Daemon, api
from .terminal_client import Term, create_running, exec_sh, running_daemon, terminal


@dataclass
class Env:
    d: Daemon
    token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with running_daemon(tmp_path_factory.mktemp("ptmx")) as d:
        yield Env(d, d.token("mallory", tier="pro"))


REPLACEMENTS = {
    "fifo": "rm -f /dev/ptmx && mkfifo /dev/ptmx",
    "file": "rm -f /dev/ptmx && echo x > /dev/ptmx",
    "symlink-to-fifo": "rm -f /dev/ptmx && mkfifo /tmp/p && ln -s /tmp/p /dev/ptmx",
}


@pytest.mark.parametrize("kind", sorted(REPLACEMENTS))
async def test_replaced_ptmx_still_gives_a_working_terminal(env: Env, kind: str) -> None:
    name = f"ptmx-{kind}"
    create_running(env.d, env.token, name)
    try:
        exec_sh(env.d, env.token, name, REPLACEMENTS[kind])
        assert exec_sh(env.d, env.token, name, "ls -l /dev/ptmx").startswith(("p", "-", "l"))
        t0 = time.monotonic()
        async with terminal(env.d, env.token, name, id="t") as t:
            # The shell's terminal is a real one of the container's devpts.
            out = await t.run("tty; stat -c %t /dev/pts/ptmx")
            assert out.startswith("/dev/pts/"), out
        assert time.monotonic() - t0 < 20
        # And the daemon answers meanwhile and after.
        code, _, _ = api(env.d, "GET", "/health", None)
        assert code == 200
        assert exec_sh(env.d, env.token, name, "echo alive") == "alive\n"
    finally:
        api(env.d, "DELETE", f"/api/containers/{name}", env.token)


async def test_many_opens_do_not_exhaust_the_daemon(env: Env) -> None:
    """More terminal opens than the daemon has pool threads, each against a FIFO
    /dev/ptmx: none may wedge a thread (each gets a terminal or an error frame)."""
    name = "ptmx-many"
    create_running(env.d, env.token, name)
    try:
        exec_sh(env.d, env.token, name, REPLACEMENTS["fifo"])

        async def one(i: int) -> list[str]:
            async with terminal(env.d, env.token, name, id=f"s{i}", wait_ready=False) as t:
                await t.until(
                    lambda: any(k in ("shell_ready", "error") for k in t.kinds) or t.closed,
                    timeout=30,
                    what="shell_ready or an error",
                )
                return _kinds(t)

        results = await asyncio.gather(*(one(i) for i in range(12)))
        assert all("shell_ready" in r for r in results), results
        assert exec_sh(env.d, env.token, name, "echo alive") == "alive\n"
    finally:
        api(env.d, "DELETE", f"/api/containers/{name}", env.token)


def _kinds(t: Term) -> list[str]:
    return list(t.kinds)
