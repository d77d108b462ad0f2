"""Reaping whoever the parent is: container inits re-parented to the daemon (a child
subreaper) when the spawner dies are waited for through their pidfds, and a stop or
delete of such a container is woken by the exit itself, never by a timeout."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    cleaning,
    db_rows,
    poll,
    running_daemon,
    unique,
)

SPAWNER_DEATHS = 3


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of ``pid``, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
    fields = raw[raw.rindex(b")") + 2 :].split()
    return comm, fields[0].decode(), int(fields[1])


def children(ppid: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every process whose parent is ``ppid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None and st[2] == ppid:
            found.append((int(entry), st[0], st[1]))
    return found


def zombies_of(ppid: int) -> list[tuple[int, str]]:
    return [(pid, comm) for pid, comm, state in children(ppid) if state == "Z"]


def spawner_pid(d: Daemon) -> int:
    assert d.proc is not None
    found = [pid for pid, comm, state in children(d.proc.pid) if comm == "rexecd-spawner"]
    found = [pid for pid in found if _stat(pid) is not None and _stat(pid)[1] != "Z"]  # type: ignore[index]
    assert len(found) == 1, children(d.proc.pid)
    return found[0]


def init_pid(d: Daemon, db_id: str) -> int:
    rows = db_rows(d, "SELECT pid FROM containers WHERE db_id = ?", db_id)
    assert rows and rows[0][0] is not None, rows
    return int(rows[0][0])


def kill_spawner(d: Daemon) -> None:
    pid = spawner_pid(d)
    os.kill(pid, signal.SIGKILL)
    poll(lambda: _stat(pid) is None or _stat(pid)[1] in ("Z", "X"), what="the spawner to die")  # type: ignore[index]


def reaped_lines(d: Daemon, pid: int) -> list[str]:
    return re.findall(rf"process {pid} exited with status \d+ \(reaped by the daemon\)", d.logs())


async def test_spawner_deaths_leave_no_zombies(daemon: Daemon) -> None:
    """Each container outlives a SIGKILLed spawner; stopping or deleting it reaps its
    init at once (the daemon is its parent now), and the dead spawners are reaped too."""
    assert daemon.proc is not None
    tok = daemon.token(unique("reap"), tier="pro")
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        adopted: list[tuple[str, int]] = []
        for _ in range(SPAWNER_DEATHS):
            name = unique("orphan")
            refs.append(name)
            rec = await c.create_running(name)
            pid = init_pid(daemon, rec["db_id"])
            kill_spawner(daemon)
            assert _stat(pid) is not None and _stat(pid)[2] == daemon.proc.pid  # type: ignore[index]
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
            assert _stat(pid) is None, (name, pid, _stat(pid))
            # The status came from waitid() on the pidfd, not from a timed-out wait.
            assert reaped_lines(daemon, pid), daemon.logs()[-3000:]
        print(f"stop/delete of re-adopted containers: {[round(t, 3) for t in timings]} s")
        # The dead spawners themselves are the daemon's children too.
        poll(lambda: not zombies_of(daemon.proc.pid), what="no zombie children of the daemon")  # type: ignore[union-attr]


async def test_adopted_init_exiting_alone_is_reaped(daemon: Daemon) -> None:
    """An init that exits on its own after its spawner died is collected by the watcher."""
    assert daemon.proc is not None
    tok = daemon.token(unique("reap"), tier="pro")
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("alone")
        refs.append(name)
        rec = await c.create_running(name)
        pid = init_pid(daemon, rec["db_id"])
        kill_spawner(daemon)
        os.kill(pid, signal.SIGKILL)
        await c.wait_status(name, "stopped")
        poll(lambda: _stat(pid) is None, what=f"init {pid} to be reaped")
        assert reaped_lines(daemon, pid)
        poll(lambda: not zombies_of(daemon.proc.pid), what="no zombie children of the daemon")  # type: ignore[union-attr]


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
    st = _stat(pid)
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
