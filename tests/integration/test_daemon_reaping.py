"""Reaping whoever the parent is: container inits re-parented to the daemon (a child
subreaper) when the spawner dies are waited for through their pidfds, and a stop or
delete of such a container is woken by the exit itself, never by a timeout."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    cleaning,
    db_rows,
    kill_spawner,
    poll,
    proc_stat,
    running_daemon,
    unique,
    zombies_of,
)

SPAWNER_DEATHS = 3


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def init_pid(d: Daemon, db_id: str) -> int:
    rows = db_rows(d, "SELECT pid FROM containers WHERE db_id = ?", db_id)
    assert rows and rows[0][0] is not None, rows
    return int(rows[0][0])


def reaped_lines(d: Daemon, pid: int, status: str = r"\d+") -> list[str]:
    """The daemon's log lines saying it collected ``pid``'s exit itself (waitid)."""
    return re.findall(
        rf"process {pid} exited with status {status} \(reaped by the daemon\)", d.logs()
    )


async def test_spawner_deaths_leave_no_zombies(daemon: Daemon) -> None:
    """Each container outlives a SIGKILLed spawner; stopping or deleting it reaps its
    init at once (the daemon is its parent now), and the dead spawners are reaped too."""
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    tok = daemon.token(unique("reap"), tier="pro")
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        adopted: list[tuple[str, int]] = []
        for _ in range(SPAWNER_DEATHS):
            name = unique("orphan")
            refs.append(name)
            rec = await c.create_running(name)
            pid = init_pid(daemon, rec["db_id"])
            kill_spawner(daemon)
            st = proc_stat(pid)
            assert st is not None and st[2] == dpid, st  # the daemon is its parent now
            adopted.append((name, pid))
        timings = []
        for i, (name, pid) in enumerate(adopted):
            t0 = time.monotonic()
            if i % 2:
                (await c.delete(f"/api/containers/{name}?volumes=true")).expect(200)
            else:
                (await c.post(f"/api/containers/{name}/stop")).expect(200)
            timings.append(time.monotonic() - t0)
            # Reaped before the answer: no zombie left for anyone to collect.
            assert proc_stat(pid) is None, (name, pid, proc_stat(pid))
            # The status came from waitid() on the pidfd, not from a timed-out wait.
            assert reaped_lines(daemon, pid), daemon.logs()[-3000:]
        print(f"stop/delete of re-adopted containers: {[round(t, 3) for t in timings]} s")
        # The dead spawners themselves are the daemon's children too.
        poll(lambda: not zombies_of(dpid), what="no zombie children of the daemon")


async def test_adopted_init_exiting_alone_is_reaped(daemon: Daemon) -> None:
    """An init that exits on its own after its spawner died is collected by the watcher."""
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    tok = daemon.token(unique("reap"), tier="pro")
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("alone")
        refs.append(name)
        rec = await c.create_running(name)
        pid = init_pid(daemon, rec["db_id"])
        kill_spawner(daemon)
        os.kill(pid, signal.SIGKILL)
        await c.wait_status(name, "stopped")
        poll(lambda: proc_stat(pid) is None, what=f"init {pid} to be reaped")
        assert reaped_lines(daemon, pid, status=str(128 + signal.SIGKILL))
        poll(lambda: not zombies_of(dpid), what="no zombie children of the daemon")


async def test_stop_after_daemon_restart_does_not_wait(daemon: Daemon) -> None:
    """After a restart an init belongs to the old daemon's nearest subreaper (often pid 1):
    the new daemon cannot collect its status and must not wait for one."""
    tok = daemon.token(unique("reap"), tier="pro")
    name = unique("restart")
    async with ApiClient(daemon, tok) as c:
        rec = await c.create_running(name)
    pid = init_pid(daemon, rec["db_id"])
    daemon.restart()
    assert daemon.proc is not None
    st = proc_stat(pid)
    assert st is not None and st[2] != daemon.proc.pid
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        refs.append(name)
        t0 = time.monotonic()
        (await c.post(f"/api/containers/{name}/stop")).expect(200)
        took = time.monotonic() - t0
        print(f"stop of a container re-adopted after a restart: {took:.3f} s (parent {st[2]})")
        assert re.search(
            rf"process {pid} exited \((its parent, pid \d+, collects it|already reaped)",
            daemon.logs(),
        )
        assert not zombies_of(daemon.proc.pid)
