"""The daemon's descriptors, mounts and threads stay flat over create/exec/terminal/
delete cycles (a short run of bench/steady.py's 200), and the counters it watches do
see a container's objects while it exists (so a flat line is not a blind one)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration import steady
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, cleaning, running_daemon, unique

CYCLES = 30


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


async def test_counters_see_a_live_container(daemon: Daemon) -> None:
    token = daemon.token(unique("u"), tier="pro")
    before = steady.sample(daemon, 0, time.monotonic())
    async with ApiClient(daemon, token) as c, cleaning(c) as refs:
        body = await c.create_running(unique("live"))
        refs.append(body["id"])
        during = steady.sample(daemon, 1, time.monotonic())
    # The container's rootfs (and its /home/user volume) are mounted under the
    # daemon's dirs while it runs: the mount columns are not blind.
    assert during.host_mounts > before.host_mounts, (before, during)
    assert during.daemon_mounts > before.daemon_mounts, (before, during)


async def test_cycles_leave_no_fds_mounts_or_threads(daemon: Daemon) -> None:
    token = daemon.token(unique("u"), tier="pro")
    samples = await steady.run(daemon, token, CYCLES, every=10)
    first, last = samples[0], samples[-1]
    assert steady.growth(first, last) == {}, [s.row() for s in samples]
    assert last.host_mounts == 0, last
