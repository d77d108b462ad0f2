"""Daemon restarts: containers outlive a crashed (SIGKILL) or stopped (SIGTERM) daemon and
the next daemon re-adopts them; one whose init died meanwhile is marked stopped, and
nothing of it is left on the host."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    bridge_ports,
    cleaning,
    db_rows,
    leases,
    leftovers,
    pid_alive,
    poll,
    running_daemon,
    unique,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def init_pid(d: Daemon, db_id: str) -> int | None:
    rows = db_rows(d, "SELECT pid FROM containers WHERE db_id = ?", db_id)
    return None if not rows or rows[0][0] is None else int(rows[0][0])


async def reachable(c: ApiClient, name: str, ip: str) -> bool:
    """Whether container ``name`` gets an answer from ``ip`` (inside the daemon's subnet)."""
    r = (await c.exec(name, f"ping -c 1 -W 2 {ip}")).expect(200)
    return bool(r["exit_code"] == 0)


def ensure_up(d: Daemon) -> None:
    if d.proc is None or d.proc.poll() is not None:
        d.start()


async def test_crash_and_readopt(daemon: Daemon) -> None:
    tok = daemon.token(unique("crash"), tier="pro")
    names = [unique("run1"), unique("run2"), unique("stopped")]
    try:
        async with ApiClient(daemon, tok) as c:
            before: dict[str, dict[str, Any]] = {}
            for n in names:
                before[n] = await c.create_running(n)
                await c.sh(n, f"echo {n} > /home/user/who")
            (await c.post(f"/api/containers/{names[2]}/stop")).expect(200)
            pids = {n: init_pid(daemon, before[n]["db_id"]) for n in names[:2]}
            assert all(pids.values())
            peer = before[names[1]]["ip_address"]
            assert await reachable(c, names[0], peer)
        ports = set(bridge_ports(daemon))

        daemon.restart(kill=True)

        async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
            refs.extend(names)
            for n in names[:2]:
                now = await c.container(n)
                assert now["status"] == "running", now
                assert now["id"] == before[n]["id"]
                assert now["ip_address"] == before[n]["ip_address"]
                assert init_pid(daemon, now["db_id"]) == pids[n]
                assert pid_alive(pids[n])  # type: ignore[arg-type]
                assert await c.sh(n, "cat /home/user/who") == f"{n}\n"
                s = (await c.get(f"/api/containers/{n}/stats")).expect(200).body
                assert s["pids"] >= 1 and s["memory"] > 0
            assert (await c.container(names[2]))["status"] == "stopped"
            assert set(bridge_ports(daemon)) == ports
            # Their network survived the crash: the two still reach each other.
            assert await reachable(c, names[0], peer)

            # The re-adopted containers are fully managed: stop, start, delete work.
            (await c.post(f"/api/containers/{names[0]}/stop")).expect(200)
            assert not pid_alive(pids[names[0]])  # type: ignore[arg-type]
            assert leftovers(daemon, before[names[0]], lease=False) == {}
            (await c.post(f"/api/containers/{names[2]}/start")).expect(200)
            assert await c.sh(names[2], "cat /home/user/who") == f"{names[2]}\n"
            # A new container gets an address nobody else holds.
            fresh = await c.create_running(unique("fresh"))
            refs.append(fresh["name"])
            ips = [x[0] for x in leases(daemon)]
            assert len(ips) == len(set(ips)) and fresh["ip_address"] in ips
            for n in names:
                (await c.delete(f"/api/containers/{n}?volumes=true")).expect(200)
                assert leftovers(daemon, before[n]) == {}
    finally:
        ensure_up(daemon)


async def test_init_killed_while_daemon_down_is_marked_stopped(daemon: Daemon) -> None:
    tok = daemon.token(unique("down"))
    victim, survivor = unique("victim"), unique("survivor")
    try:
        async with ApiClient(daemon, tok) as c:
            v = await c.create_running(victim)
            s = await c.create_running(survivor)
        vpid, spid = init_pid(daemon, v["db_id"]), init_pid(daemon, s["db_id"])
        assert vpid and spid

        daemon.stop(kill=True)
        os.kill(vpid, signal.SIGKILL)
        poll(lambda: not pid_alive(vpid), 10, what=f"pid {vpid} to die")
        daemon.start()

        async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
            refs.extend([victim, survivor])
            now = await c.container(victim)
            assert now["status"] == "stopped", now
            # Its cgroup, veth and run dir are gone (the lease stays with the stopped record).
            assert leftovers(daemon, v, lease=False) == {}
            assert (await c.container(survivor))["status"] == "running"
            assert init_pid(daemon, s["db_id"]) == spid
            assert await c.sh(survivor, "echo ok") == "ok\n"
            # It can be started again.
            (await c.post(f"/api/containers/{victim}/start")).expect(200)
            assert await c.sh(victim, "echo back") == "back\n"
            for n, obj in ((victim, v), (survivor, s)):
                (await c.delete(f"/api/containers/{n}?volumes=true")).expect(200)
                assert leftovers(daemon, obj) == {}
    finally:
        ensure_up(daemon)


async def test_graceful_stop_leaves_containers_running(daemon: Daemon) -> None:
    tok = daemon.token(unique("term"))
    name = unique("term")
    try:
        async with ApiClient(daemon, tok) as c:
            c0 = await c.create_running(name)
            await c.sh(name, "sleep 1000 >/dev/null 2>&1 &")
            pid = init_pid(daemon, c0["db_id"])
            assert pid
            ws = await c.ws("/api/containers/events")
            assert (await ws.receive_json(timeout=10))["type"] == "list"
            daemon.stop()  # SIGTERM
            assert daemon.proc is not None and daemon.proc.returncode == 0, daemon.logs()[-2000:]
            # Open sockets get a clean close frame, "going away".
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
            await ws.close()
        assert pid_alive(pid)
        daemon.start()
        async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
            refs.append(name)
            now = await c.container(name)
            assert now["status"] == "running" and init_pid(daemon, c0["db_id"]) == pid
            assert "sleep 1000" in await c.sh(name, "ps -o args")
            (await c.delete(f"/api/containers/{name}?volumes=true")).expect(200)
            assert leftovers(daemon, c0) == {}
    finally:
        ensure_up(daemon)


async def test_restart_while_creating_leaves_nothing(daemon: Daemon) -> None:
    """A daemon killed right after accepting creates: the half-made ones end as error or
    running (never stuck in creating), and deleting them leaves nothing."""
    tok = daemon.token(unique("mid"), tier="pro")
    try:
        async with ApiClient(daemon, tok) as c:
            made = [(await c.create(unique("mid"))).expect(202).body for _ in range(4)]
        daemon.restart(kill=True)
        async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
            refs.extend(m["id"] for m in made)
            for m in made:
                now = await c.container(m["id"])
                assert now["status"] in ("running", "error"), now
                if now["status"] == "running":
                    assert await c.sh(m["id"], "echo up") == "up\n"
            for m in made:
                (await c.delete(f"/api/containers/{m['id']}?volumes=true")).expect(200)
                assert leftovers(daemon, m) == {}
    finally:
        ensure_up(daemon)
