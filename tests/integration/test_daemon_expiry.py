"""Session expiry on a real daemon: a tier with a tiny ``session_hours`` gets its container
stopped with status ``expired`` (data kept), reported as an event, and that tier cannot
start it again; a tier without a session limit is left alone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    cleaning,
    leftovers,
    running_daemon,
    unique,
    volume_image,
)

SESSION_HOURS = 0.001  # 3.6 s: time to write a file, then it expires
GUEST = {
    "cpu_millicores": 500,
    "memory_mb": 512,
    "disk_mb": 2048,
    "containers": 2,
    "session_hours": SESSION_HOURS,
    "network_mbps": 10,
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory, overrides={"tiers": {"guest": GUEST}}) as d:
        yield d


async def test_expired_session_stops_container_and_keeps_data(daemon: Daemon) -> None:
    guest = daemon.token(unique("guest"), tier="guest")
    pro = daemon.token(unique("pro"), tier="pro")
    name, lasting = unique("short"), unique("lasting")
    async with (
        ApiClient(daemon, guest) as g,
        ApiClient(daemon, pro) as p,
        cleaning(g) as g_refs,
        cleaning(p) as p_refs,
    ):
        g_refs.append(name)
        p_refs.append(lasting)
        ws = await g.ws("/api/containers/events")
        try:
            assert (await ws.receive_json(timeout=10))["type"] == "list"
            created = (await g.create(name)).expect(202).body
            assert created["expires_at"] is not None
            await p.create_running(lasting)
            assert (await p.container(lasting))["expires_at"] is None
            try:
                await g.wait_status(name, "running", timeout=10)
                await g.sh(name, "echo survives > /home/user/data")
            except AssertionError:
                pytest.fail("the container expired before the test could write to it")

            # The daemon checks sessions periodically (every 10 s): wait for the event.
            deadline = time.monotonic() + 30
            expired = None
            while expired is None:
                left = deadline - time.monotonic()
                assert left > 0, "no expiry event within 30 s"
                msg = await ws.receive(timeout=left)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                frame = msg.json()
                c = frame.get("container") or {}
                if c.get("name") == name and c.get("status") == "expired":
                    expired = frame
            assert expired["type"] == "stopped"
        finally:
            await ws.close()

        now = await g.container(name)
        assert now["status"] == "expired"
        assert leftovers(daemon, created, lease=False) == {}
        assert volume_image(daemon, created["user_id"], name).exists()  # data kept

        r = (await g.post(f"/api/containers/{name}/start")).expect(403)
        assert r["error"]
        (await g.post(f"/api/containers/{name}/restart")).expect(403)
        (await g.exec(name, "true")).expect(409)
        assert (await g.container(name))["status"] == "expired"

        # The unlimited tier's container is untouched.
        assert (await p.container(lasting))["status"] == "running"
        assert await p.sh(lasting, "echo fine") == "fine\n"

        # The owner can delete it; the /home/user volume is kept for the same name, and a
        # new container of that name (with a new session) finds the data.
        (await g.delete(f"/api/containers/{name}")).expect(200)
        assert leftovers(daemon, created) == {}
        again = await g.create_running(name)
        assert again["id"] != created["id"]
        assert await g.sh(name, "cat /home/user/data") == "survives\n"
