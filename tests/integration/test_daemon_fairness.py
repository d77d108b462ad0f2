"""One tenant cannot stall the API for everyone: FIFOs and long execs hold no shared
worker thread, authentication and /health never queue behind tenant work, and a
daemon with such requests in flight still stops on SIGTERM.

Deadlines here are generous (seconds, where the answers take milliseconds): they tell
"answers" from "hangs", they measure nothing. bench/fairness.py measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

import pytest
import yaml

from tests.deadlines import scaled
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    Reply,
    running_daemon,
    unique,
    until_running,
)

F = "/api/containers/{}/files"
# Far more than the default thread pool of a 2-CPU host (6) and below the default
# per-user exec cap (16).
SATURATING_EXECS = 12
# "Answers" rather than "hangs": the old daemon took 37 s, or forever.
ANSWER_S = 5.0
T = TypeVar("T")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


@contextlib.asynccontextmanager
async def running_box(d: Daemon, prefix: str) -> AsyncIterator[tuple[ApiClient, str]]:
    name = unique(prefix)
    async with ApiClient(d, d.token(unique(prefix))) as c:
        try:
            await c.create_running(name)
            yield c, name
        finally:
            await c.remove(name)


async def answers(coro: Awaitable[T], what: str) -> T:
    """``coro``'s result, or a failure naming ``what`` if it hangs."""
    try:
        return await asyncio.wait_for(coro, scaled(ANSWER_S))
    except TimeoutError:
        raise AssertionError(f"{what} did not answer within {scaled(ANSWER_S)} s") from None


async def assert_responsive(other: ApiClient, other_box: str) -> None:
    """/health and another user's GET both answer, and correctly."""
    r: Reply = await answers(other.get("/health", anonymous=True), "/health")
    assert r.status == 200, r
    r = await answers(other.get(f"/api/containers/{other_box}"), "another user's GET")
    assert r.status == 200 and r.body["name"] == other_box, r


async def test_download_of_a_fifo_is_refused_at_once_and_the_daemon_stays_responsive(
    daemon: Daemon,
) -> None:
    async with running_box(daemon, "fifo") as (c, name), running_box(daemon, "other") as (o, oname):
        await c.sh(name, "mkfifo /home/user/pipe /tmp/pipe2")
        # Concurrent, so the old daemon would have had two threads stuck at once.
        replies = await answers(
            asyncio.gather(
                c.get(F.format(name), params={"path": "/home/user/pipe"}),
                c.get(F.format(name), params={"path": "/tmp/pipe2"}),
            ),
            "a download of a FIFO",
        )
        for r in replies:
            assert r.status == 400, r
            assert "not a regular file" in r.body["error"], r.body
        await assert_responsive(o, oname)
        # Nothing was left open on the FIFO: a writer inside finds no reader.
        out = await c.sh(
            name, "if timeout 1 sh -c 'echo x > /home/user/pipe'; then echo reader; fi; echo done"
        )
        assert out == "done\n", out


async def test_exec_as_a_user_when_etc_passwd_is_a_fifo_answers_an_error(daemon: Daemon) -> None:
    async with running_box(daemon, "pwfifo") as (c, name), running_box(daemon, "o") as (o, oname):
        await c.sh(name, "rm /etc/passwd && mkfifo /etc/passwd")
        r = await answers(c.exec(name, "id -u", user="nobody"), "an exec as a named user")
        assert r.status == 400, r
        assert "/etc/passwd" in r.body["error"], r.body
        # A numeric user needs no lookup... but still reads /etc/passwd for its group:
        # either way the answer comes, and the daemon stays responsive.
        r = await answers(c.exec(name, "id -u", user="1234"), "an exec as a numeric user")
        assert r.status in (200, 400), r
        await assert_responsive(o, oname)


async def test_other_users_and_health_stay_responsive_while_one_user_saturates_execs(
    daemon: Daemon,
) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.25"  # busybox sleep takes fractions
    async with running_box(daemon, "busy") as (c, name), running_box(daemon, "calm") as (o, oname):
        hogs = [
            asyncio.ensure_future(c.exec(name, f"sleep {marker}", timeout_seconds=120))
            for _ in range(SATURATING_EXECS)
        ]
        try:
            await until_running(f"sleep\0{marker}", SATURATING_EXECS)
            for _ in range(3):
                await assert_responsive(o, oname)
            # The other user's own exec runs too.
            r = await answers(o.exec(oname, "echo hi"), "another user's exec")
            assert r.status == 200 and r.body["stdout"] == "hi\n", r
        finally:
            # Stopping the container ends every exec in it; each answers with the kill.
            await c.post(f"/api/containers/{name}/stop", params={"timeout": "0"})
            done = await asyncio.wait_for(asyncio.gather(*hogs), scaled(60))
        for r in done:
            assert r.status == 200 and r.body["exit_code"] != 0, r


@pytest.fixture
def own_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon of the test's own, to stop: set up and removed outside the event loop."""
    with running_daemon(tmp_path_factory) as d:
        yield d


async def test_daemon_with_requests_in_flight_stops_on_sigterm_within_stop_timeout(
    own_daemon: Daemon,
) -> None:
    d = own_daemon
    stop_timeout = float(yaml.safe_load(d.config.read_text())["stop_timeout_s"])
    marker = f"{secrets.randbelow(10**6) + 10**6}.5"
    name = unique("term")
    async with ApiClient(d, d.token(unique("term"))) as c:
        await c.create_running(name)
        await c.sh(name, "mkfifo /home/user/pipe")
        execs = [
            asyncio.ensure_future(c.exec(name, f"sleep {marker}", timeout_seconds=120))
            for _ in range(6)
        ]
        await until_running(f"sleep\0{marker}", 6)
        fifo_reads = [
            asyncio.ensure_future(c.get(F.format(name), params={"path": "/home/user/pipe"}))
            for _ in range(6)
        ]
        await asyncio.sleep(0.5)  # let the reads reach the daemon; nothing to poll for
        assert d.proc is not None
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        limit = stop_timeout + scaled(5.0)
        try:
            await asyncio.to_thread(d.proc.wait, limit + scaled(60))
        finally:
            took = time.monotonic() - started
            for t in execs + fifo_reads:
                t.cancel()
            await asyncio.gather(*execs, *fifo_reads, return_exceptions=True)
        assert took <= limit, f"SIGTERM took {took:.1f} s (limit {limit:.1f} s)"
        assert d.proc.returncode == 0, d.logs()[-3000:]
    # The container outlives the daemon; the next daemon finds it and can remove it.
    await asyncio.to_thread(d.start)
    async with ApiClient(d, c.token) as c2:
        await c2.remove(name)
