"""Deleting a container whose create still runs answers at once, whatever the create is
doing: waiting for a stalled pull from a real registry on loopback (Debian's
docker-registry behind a proxy that holds the blob), installing a role whose setup
never ends, or spawning an init that never gets ready (its cgroup frozen). Each delete
returns within DELETE_BOUND_S, far below the step it cut (minutes, or never), and leaves
nothing of the container: record, cgroup, veth, mount, loop device, IP and id-range
leases, image lease, role layer, log file. The create's stream ends with an error frame
saying it was deleted, and a ``deleted`` event is published. A shared pull goes on for
the other create waiting on it; when the create building a role is deleted, the next
create of the same pair builds it."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.deadlines import scaled
from tests.integration.daemon import Daemon, free_port
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    cgroup_parent_dirs,
    cleaning,
    db_rows,
    leftovers,
    pids_with_cmdline,
    running_daemon,
    unique,
    until_running,
    volume_image,
)
from tests.integration.registry import (
    CutProxy,
    Registry,
    busybox_rootfs,
    mirror_of_hub,
    push_image,
)
from tests.integration.registry import catalogue_entry as entry
from tests.unit.fakes.images import layer, reg

SIZES = {"memory_mb": 64, "disk_mb": 64, "cpu_shares": 250}
# What a delete of a creating container may take: the step it interrupts takes
# minutes (a stalled pull: read timeout times retries), an hour, or forever.
DELETE_BOUND_S = 10.0
# A stalled blob read gives up only after this long (and is then retried).
READ_TIMEOUT_S = 300
# The role's setup step: an install that would run for an hour.
SLEEP = "sleep 3529"
EVENTS = "/api/containers/events"


@pytest.fixture(scope="module")
def proxy_port() -> int:
    """Where the daemon's Docker Hub mirror is: a CutProxy the pull test starts."""
    return free_port()


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, proxy_port: int) -> Iterator[Daemon]:
    overrides = {
        "registries": mirror_of_hub(f"127.0.0.1:{proxy_port}", read_timeout_s=READ_TIMEOUT_S),
        "images": {"catalogue": [entry("stall:1", "docker.io/library/stall:1")]},
        "roles": [
            {
                "id": "sleepy",
                "name": "Sleepy",
                "description": "a setup step that runs for an hour",
                "setup": ["echo rexecd-sleepy", f"exec {SLEEP}"],
            }
        ],
    }
    with running_daemon(tmp_path_factory, overrides) as daemon:
        yield daemon


# ------------------------------------------------------------------ helpers


def start_stream(c: ApiClient, body: dict[str, Any]) -> asyncio.Task[list[dict[str, Any]]]:
    """A streamed create running in the background: its frames once it ends."""

    async def frames() -> list[dict[str, Any]]:
        status, _, got = await c.stream_create(body)
        assert status == 200, got
        return got

    return asyncio.ensure_future(frames())


async def creating(c: ApiClient, name: str) -> dict[str, Any]:
    """The container object once the create's record exists."""

    async def found() -> dict[str, Any] | None:
        r = await c.get(f"/api/containers/{name}")
        return r.body if r.status == 200 else None

    return await apoll(found, what=f"the record of {name}")


async def delete_timed(c: ApiClient, name: str) -> float:
    started = time.monotonic()
    r = await c.delete(f"/api/containers/{name}?volumes=true")
    took = time.monotonic() - started
    r.expect(200)
    print(f"delete of creating {name} took {took:.2f}s")
    return took


async def deleted_event(ws: aiohttp.ClientWebSocketResponse, cid: str) -> None:
    deadline = time.monotonic() + scaled(10)
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no deleted event"
        ev = json.loads((await asyncio.wait_for(ws.receive(), left)).data)
        if ev["type"] == "deleted" and (ev.get("container") or {}).get("id") == cid:
            return


def assert_cancelled_stream(frames: list[dict[str, Any]], cid: str) -> None:
    last = frames[-1]
    assert last.get("error") and "deleted" in last["error"], last
    assert "deleted" in last["message"] and not last["complete"], last
    assert last["container_id"] == cid
    assert all(f["stage"] != "ready" for f in frames), frames


def role_layers(d: Daemon) -> list[str]:
    return sorted(p.name for p in (d.state / "images" / "roles").iterdir())


def nothing_left(d: Daemon, c: dict[str, Any], roles_before: list[str]) -> None:
    cid, db_id = c["id"], c["db_id"]
    assert leftovers(d, c) == {}
    assert db_rows(d, "SELECT name FROM containers WHERE db_id = ?", db_id) == []
    assert db_rows(d, "SELECT slot FROM userns_leases WHERE container_db_id = ?", db_id) == []
    assert not (d.state / "images" / "leases" / f"{cid}.json").exists()
    assert not (d.state / "logs" / f"{cid}.log").exists()
    assert not volume_image(d, c["user_id"], c["name"]).exists()
    assert [str(p) for p in d.state.glob(f"*/{cid}*")] == []
    assert role_layers(d) == roles_before


# ------------------------------------------------------------------ the tests


async def test_delete_during_a_stalled_pull_is_prompt_and_the_pull_goes_on(
    d: Daemon, registry: Registry, proxy_port: int
) -> None:
    big = layer(reg("big.bin", os.urandom(6 << 20)))
    push_image(registry, "library/stall", "1", [busybox_rootfs(), big], gzip_layers=False)
    proxy = CutProxy(registry.port)
    proxy.port = proxy_port
    await proxy.start()
    roles_before = role_layers(d)
    try:
        # About 3 MiB into the big blob the registry goes silent; a read gives up only
        # after READ_TIMEOUT_S, and is retried.
        proxy.hold_after(3 << 20)
        async with ApiClient(d, d.token(unique("pull"))) as c, cleaning(c) as refs:
            ws = await c.ws(EVENTS)
            assert (await ws.receive_json())["type"] == "list"
            doomed, patient = unique("doomed"), unique("patient")
            refs += [doomed, patient]
            first = start_stream(c, {"image": "stall:1", "name": doomed, **SIZES})
            await asyncio.wait_for(proxy.held.wait(), scaled(30))
            other = start_stream(c, {"image": "stall:1", "name": patient, **SIZES})
            obj = await creating(c, doomed)
            await creating(c, patient)
            assert obj["status"] == "creating"

            assert await delete_timed(c, doomed) < scaled(DELETE_BOUND_S)
            frames = await asyncio.wait_for(first, scaled(10))
            assert_cancelled_stream(frames, obj["id"])
            assert any(f["stage"] == "pulling" for f in frames), frames
            await deleted_event(ws, obj["id"])
            await ws.close()
            nothing_left(d, obj, roles_before)
            (await c.get(f"/api/containers/{doomed}")).expect(404)

            # The pull the two shared is still there for the other create: the registry
            # comes back (the held connection closes), the pull resumes and completes.
            assert (await c.container(patient))["status"] == "creating"
            proxy.drop()
            got = await asyncio.wait_for(other, scaled(120))
            assert got[-1]["stage"] == "ready", got[-1]
    finally:
        await proxy.close()


async def test_delete_during_a_role_install_is_prompt_and_the_next_waiter_builds(
    d: Daemon,
) -> None:
    roles_before = role_layers(d)
    async with ApiClient(d, d.token(unique("role"))) as c, cleaning(c) as refs:
        ws = await c.ws(EVENTS)
        assert (await ws.receive_json())["type"] == "list"
        builder, waiter = unique("builder"), unique("waiter")
        refs += [builder, waiter]
        body = {"image": "busybox", "role": "sleepy", **SIZES}
        first = start_stream(c, {**body, "name": builder})
        await until_running(SLEEP, 1)
        obj = await creating(c, builder)
        assert obj["status"] == "configuring"
        # The same pair: it waits for the first create's build.
        second = start_stream(c, {**body, "name": waiter})
        other = await creating(c, waiter)
        assert other["status"] == "creating"

        installing = set(pids_with_cmdline(SLEEP.encode()))
        assert await delete_timed(c, builder) < scaled(DELETE_BOUND_S)
        # The first build's processes were killed before the delete answered.
        assert installing.isdisjoint(pids_with_cmdline(SLEEP.encode()))
        frames = await asyncio.wait_for(first, scaled(10))
        assert_cancelled_stream(frames, obj["id"])
        assert any("installing on busybox" in f["message"] for f in frames), frames
        await deleted_event(ws, obj["id"])
        nothing_left(d, obj, roles_before)

        # The waiter builds now, in its own build container.
        await c.wait_status(waiter, "configuring", timeout=30)

        async def its_own_build() -> bool:
            return bool(set(pids_with_cmdline(SLEEP.encode())) - installing)

        await apoll(its_own_build, what="the waiter's build")
        assert await delete_timed(c, waiter) < scaled(DELETE_BOUND_S)
        frames = await asyncio.wait_for(second, scaled(10))
        assert_cancelled_stream(frames, other["id"])
        assert any("installing on busybox" in f["message"] for f in frames), frames
        await deleted_event(ws, other["id"])
        await ws.close()
        nothing_left(d, other, roles_before)
    # No build process outlives its deleted container.
    assert pids_with_cmdline(SLEEP.encode()) == []


def frozen_parent(d: Daemon) -> Path:
    dirs = cgroup_parent_dirs(d)
    if set(dirs) != {""}:
        pytest.skip("freezing a starting container's cgroup needs cgroup v2")
    freeze = dirs[""] / "cgroup.freeze"
    if not freeze.exists():
        pytest.skip(f"{freeze} missing: no cgroup v2 freezer")
    return freeze


async def test_delete_during_a_launch_that_never_gets_ready_is_prompt(d: Daemon) -> None:
    # Every container the daemon starts joins a frozen cgroup: its init never reports
    # ready, and the spawn would wait for it forever.
    freeze = frozen_parent(d)
    roles_before = role_layers(d)
    freeze.write_text("1")
    try:
        async with ApiClient(d, d.token(unique("launch"))) as c, cleaning(c) as refs:
            ws = await c.ws(EVENTS)
            assert (await ws.receive_json())["type"] == "list"
            name = unique("frozen")
            refs.append(name)
            first = start_stream(c, {"image": "busybox", "name": name, **SIZES})
            obj = await creating(c, name)
            procs = freeze.parent / obj["id"] / "cgroup.procs"

            def joined() -> bool:
                try:
                    return bool(procs.read_text().split())
                except OSError:
                    return False

            await apoll(lambda: asyncio.sleep(0, joined()), what="the init in its cgroup")
            assert (await c.container(name))["status"] == "creating"

            assert await delete_timed(c, name) < scaled(DELETE_BOUND_S)
            frames = await asyncio.wait_for(first, scaled(10))
            assert_cancelled_stream(frames, obj["id"])
            await deleted_event(ws, obj["id"])
            await ws.close()
            nothing_left(d, obj, roles_before)
    finally:
        freeze.write_text("0")


async def test_delete_racing_a_quick_create_leaves_nothing(d: Daemon) -> None:
    """On any host (no freezer needed): a delete sent as soon as the record exists
    meets the create at whatever step it is (validating, launching, or done), and
    either way answers promptly and leaves nothing."""
    roles_before = role_layers(d)
    async with ApiClient(d, d.token(unique("race"))) as c, cleaning(c) as refs:
        outcomes = []
        for _ in range(5):
            name = unique("racer")
            refs.append(name)
            stream = start_stream(c, {"image": "busybox", "name": name, **SIZES})
            obj = await creating(c, name)
            assert await delete_timed(c, name) < scaled(DELETE_BOUND_S)
            frames = await asyncio.wait_for(stream, scaled(10))
            last = frames[-1]
            if last["stage"] == "ready":
                outcomes.append("ready")  # the create won; the delete halted it
            else:
                assert_cancelled_stream(frames, obj["id"])
                outcomes.append("cancelled")
            nothing_left(d, obj, roles_before)
        print(f"delete racing create: {outcomes}")
