"""Resource limits through a real daemon, driven over HTTP like a client: a memory hog is
OOM-killed at memory_mb and reported, cpu_shares holds a two-process burner to its quota
and a live change takes effect, a fork bomb stops at limits.pids_max while the daemon
keeps answering, and the tier's disk_mbps/disk_iops hold a direct-IO writer and reader.

Whichever cgroup driver the kernel offers is used (v1 on the CI host, v2 inside the
QEMU guest of tests/vm). ``REXECD_TEST_SLOW`` (set by the guest harness) stretches
deadlines, never measurement windows or tolerances. The daemon runs without networking:
nothing here needs it, and the guest has no bridge or nftables to offer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.deadlines import SLOW, scaled
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    cgroup_dirs,
    cleaning,
    leftovers,
    running_daemon,
    unique,
)

MiB = 1024 * 1024
EVENTS = "/api/containers/events"
PIDS_MAX = 64  # low, so a fork bomb fills it quickly even on 2 emulated vCPUs
DISK_MBPS = 4  # small enough that the throttle, not the disk, sets the pace
DISK_IOPS = 50
TOLERANCE = 0.15
# The /health deadline while a fork bomb runs. Not stretched for the emulated guest:
# the bomb is held to half a core, so the daemon keeps a CPU (17 ms seen there).
HEALTH_S = 1.0

_FREE = {
    "cpu_millicores": 2000,
    "memory_mb": 2048,
    "disk_mb": 10240,
    "containers": 5,
    "session_hours": 50,
    "network_mbps": 50,
}
_ENTERPRISE = {
    "cpu_millicores": 8000,
    "memory_mb": 8192,
    "disk_mb": 51200,
    "containers": 20,
    "session_hours": None,
    "network_mbps": 1000,
}
OVERRIDES: dict[str, Any] = {
    "network": {"enabled": False},
    "limits": {"pids_max": PIDS_MAX},
    # One throttle per tier, so each test measures one of them alone; "pro" keeps its
    # defaults for the cpu, memory and pids tests.
    "tiers": {
        "free": {**_FREE, "disk_mbps": DISK_MBPS, "disk_iops": None},
        "enterprise": {**_ENTERPRISE, "disk_mbps": None, "disk_iops": DISK_IOPS},
    },
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory, overrides=OVERRIDES) as d:
        yield d


async def running(c: ApiClient, name: str, **resources: int) -> dict[str, Any]:
    """A new busybox container, running; a small disk keeps mkfs cheap in the guest."""
    (await c.create(name, **{"disk_mb": 64, **resources})).expect(202)
    return await c.wait_status(name, "running", timeout=30)


def exec_body(command: str, timeout: float) -> dict[str, Any]:
    return {"command": command, "timeout_seconds": int(min(300, timeout))}


async def stats(c: ApiClient, name: str) -> dict[str, Any]:
    body: dict[str, Any] = (await c.get(f"/api/containers/{name}/stats")).expect(200).body
    return body


async def cores_used(c: ApiClient, name: str, seconds: float = 3.0) -> float:
    """CPU the container used over ``seconds`` of wall time, in cores (a measurement
    window, not a wait for anything)."""
    s0, t0 = (await stats(c, name))["cpu_usage_usec"], time.monotonic()
    await asyncio.sleep(seconds)
    s1, t1 = (await stats(c, name))["cpu_usage_usec"], time.monotonic()
    return float(s1 - s0) / ((t1 - t0) * 1e6)


async def pids_at_least(c: ApiClient, name: str, n: int, timeout: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        s = await stats(c, name)
        return s if s["pids"] >= n else None

    return await apoll(check, timeout, what=f"{name} to have {n} processes")


async def next_event(
    ws: aiohttp.ClientWebSocketResponse, kind: str, cid: str, timeout: float
) -> dict[str, Any]:
    """The first event frame of ``kind`` about container ``cid``, within ``timeout``."""
    seen: list[str] = []
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            msg = await asyncio.wait_for(ws.receive(), max(left, 0.0))
        except TimeoutError:
            raise AssertionError(
                f"no {kind!r} event for {cid} in {timeout:.0f}s; saw {seen}"
            ) from None
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame: dict[str, Any] = msg.json()
        seen.append(frame["type"])
        if frame["type"] == kind and frame.get("container", {}).get("id") == cid:
            return frame


def timed_dd(dd: str) -> str:
    """``dd`` timed inside the container: busybox dd prints no rate, and timing it from
    the client would count exec start-up too. Prints "<uptime before> <after> <dd's status>"."""
    return (
        "a=$(cut -d' ' -f1 /proc/uptime); "
        f"{dd} 2>/tmp/dd.err; rc=$?; "
        "b=$(cut -d' ' -f1 /proc/uptime); "
        'cat /tmp/dd.err >&2; echo "$a $b $rc"'
    )


def dd_seconds(result: dict[str, Any]) -> float:
    m = re.search(r"^([\d.]+) ([\d.]+) (\d+)$", result["stdout"], re.MULTILINE)
    assert m, result
    assert m.group(3) == "0", result
    return float(m.group(2)) - float(m.group(1))


async def test_memory_hog_is_oom_killed_and_reported(daemon: Daemon) -> None:
    name, limit = unique("oom"), 32
    async with ApiClient(daemon, daemon.token(unique("oom"), tier="pro")) as c, cleaning(c) as refs:
        refs.append(name)
        ws = await c.ws(EVENTS)
        try:
            assert (await asyncio.wait_for(ws.receive_json(), 15 * SLOW))["type"] == "list"
            ctr = await running(c, name, memory_mb=limit, cpu_shares=1000)
            assert ctr["resources"]["memory_mb"] == limit

            peak = 0
            done = asyncio.Event()

            async def sample() -> None:
                # Memory is never above the limit, sampled all through the hog's life.
                nonlocal peak
                while not done.is_set():
                    s = await stats(c, name)
                    assert s["memory_limit"] == limit * MiB, s
                    assert s["memory"] <= s["memory_limit"], s
                    peak = max(peak, s["memory"])
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            try:
                # busybox sh keeps the command substitution in its own memory: 200 MB.
                hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived ${#x}"
                r = await c.post(f"/api/containers/{name}/exec", exec_body(hog, 120 * SLOW))
            finally:
                done.set()
                await sampler
            r.expect(200)
            assert r["exit_code"] == 128 + 9, r.body
            assert "survived" not in r["stdout"], r.body

            async def counted() -> dict[str, Any] | None:
                s = await stats(c, name)
                return s if s["oom_kills"] >= 1 else None

            s = await apoll(counted, 30, what="oom_kills in stats")
            assert s["memory"] <= s["memory_limit"] == limit * MiB
            frame = await next_event(ws, "oom", ctr["id"], 30)
            assert frame["container"]["name"] == name
            print(
                f"oom: memory_mb={limit}, peak sampled {peak / MiB:.1f} MiB, "
                f"oom_kills={s['oom_kills']}, exit {r['exit_code']}"
            )
            # Only the hog was chosen: init and the container live on.
            assert (await c.container(name))["status"] == "running"
            assert await c.sh(name, "echo alive") == "alive\n"
        finally:
            await ws.close()


async def test_cpu_quota_holds_and_a_live_change_takes_effect(daemon: Daemon) -> None:
    name = unique("cpu")
    async with ApiClient(daemon, daemon.token(unique("cpu"), tier="pro")) as c, cleaning(c) as refs:
        refs.append(name)
        await running(c, name, cpu_shares=500)
        burn = "(while :; do :; done) >/dev/null 2>&1 </dev/null &"
        await c.sh(name, f"{burn} {burn} echo started")
        await pids_at_least(c, name, 3, 30)  # init and the two loops

        used = await cores_used(c, name)
        print(f"cpu quota 500m: measured {used * 1000:.0f}m")
        assert used == pytest.approx(0.5, rel=TOLERANCE)

        r = (await c.patch(f"/api/containers/{name}/settings", {"cpu_shares": 250})).expect(200)
        assert r["restarted"] is False
        assert r["container"]["resources"]["cpu_shares"] == 250
        used = await cores_used(c, name)
        print(f"cpu quota 250m after a live change: measured {used * 1000:.0f}m")
        assert used == pytest.approx(0.25, rel=TOLERANCE)
        assert (await c.container(name))["status"] == "running"


async def test_fork_bomb_stops_at_pids_max_and_the_daemon_answers(daemon: Daemon) -> None:
    name = unique("bomb")
    async with (
        ApiClient(daemon, daemon.token(unique("bomb"), tier="pro")) as c,
        cleaning(c) as refs,
    ):
        refs.append(name)
        # Half a core: the bomb cannot starve the daemon of the host's (or guest's) CPUs.
        ctr = await running(c, name, cpu_shares=500)
        # busybox sh exits when a fork fails, so the classic b|b& collapses the moment it
        # meets the cap. Here each bomb branch stays alive (sleep), and an interactive
        # shell, which survives a failed fork, keeps launching new bombs from yes's
        # endless lines: the cgroup stays full and fork() keeps being tried against it.
        bomb = "b(){ b|b & sleep 1000; }; b &"
        r = await c.exec(name, f"(yes '{bomb}' | sh -i) >/dev/null 2>&1 </dev/null & echo go")
        assert r.expect(200)["stdout"] == "go\n", r.body
        await pids_at_least(c, name, PIDS_MAX - 2, 60)

        slowest = 0.0
        highest = 0
        for _ in range(10):
            t0 = time.monotonic()
            (await c.get("/health", anonymous=True)).expect(200)
            slowest = max(slowest, time.monotonic() - t0)
            s = await stats(c, name)
            highest = max(highest, s["pids"])
            assert s["pids"] <= PIDS_MAX, s
            await asyncio.sleep(0.2)
        print(
            f"fork bomb: pids peaked at {highest} (max {PIDS_MAX}), slowest /health {slowest:.3f}s"
        )
        assert slowest < HEALTH_S
        # Full: a command that needs a few processes cannot get them.
        r = await c.exec(name, "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; echo forked")
        assert r.expect(200)["exit_code"] != 0 and "forked" not in r["stdout"], r.body
        assert "can't fork" in r["stderr"], r.body

        r = await c.post(f"/api/containers/{name}/stop?timeout=1")
        r.expect(200)
        assert (await c.container(name))["status"] == "stopped"

        async def clean() -> bool:
            return leftovers(daemon, ctr, lease=False) == {}

        await apoll(clean, 20, what="the bomb's cgroup and mounts to go")
        assert cgroup_dirs(daemon, ctr["id"]) == []


async def test_disk_bandwidth_is_held_for_writes_and_reads(daemon: Daemon) -> None:
    name, count = unique("io"), 16
    async with (
        ApiClient(daemon, daemon.token(unique("io"), tier="free")) as c,
        cleaning(c) as refs,
    ):
        refs.append(name)
        await running(c, name, memory_mb=128)
        # A live settings change re-applies the whole policy: the throttle must survive it.
        r = (await c.patch(f"/api/containers/{name}/settings", {"memory_mb": 96})).expect(200)
        assert r["restarted"] is False

        rate = DISK_MBPS * MiB
        for direction, dd in (
            ("write", f"dd if=/dev/zero of=/home/user/f bs=1M count={count} oflag=direct"),
            ("read", f"dd if=/home/user/f of=/dev/null bs=1M count={count} iflag=direct"),
        ):
            r = await c.post(f"/api/containers/{name}/exec", exec_body(timed_dd(dd), 120 * SLOW))
            r.expect(200)
            measured = count * MiB / dd_seconds(r.body)
            print(f"io {direction} at disk_mbps={DISK_MBPS}: measured {measured / MiB:.2f} MiB/s")
            assert measured == pytest.approx(rate, rel=TOLERANCE), r.body
        s = await stats(c, name)
        assert s["disk_write"] >= count * MiB and s["disk_read"] >= count * MiB, s


async def test_disk_iops_are_held(daemon: Daemon) -> None:
    name, count = unique("iops"), 200
    async with (
        ApiClient(daemon, daemon.token(unique("iops"), tier="enterprise")) as c,
        cleaning(c) as refs,
    ):
        refs.append(name)
        await running(c, name, memory_mb=128)
        dd = f"dd if=/dev/zero of=/home/user/g bs=4k count={count} oflag=direct"
        r = await c.post(f"/api/containers/{name}/exec", exec_body(timed_dd(dd), 120 * SLOW))
        r.expect(200)
        measured = count / dd_seconds(r.body)
        print(f"io at disk_iops={DISK_IOPS}: measured {measured:.1f} writes/s")
        assert measured == pytest.approx(DISK_IOPS, rel=TOLERANCE), r.body
