"""Per-user caps on requests in flight (``concurrency`` in the config): one request past
the cap answers 429 at once, other users are not counted against it, and a slot frees
when its request ends (a download's when its last byte has gone)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import aiohttp
import pytest

from tests.deadlines import scaled
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    running_daemon,
    unique,
    until_running,
)

EXEC_CAP = 3
FILES_CAP = 2
F = "/api/containers/{}/files"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    caps = {"concurrency": {"exec_per_user": EXEC_CAP, "file_ops_per_user": FILES_CAP}}
    with running_daemon(tmp_path_factory, caps) as d:
        yield d


def assert_concurrency_limited(status: int, body: dict[str, object], headers: dict[str, str]):
    assert status == 429, (status, body)
    assert body["code"] == "concurrency_limited", body
    assert "in flight" in str(body["error"]), body
    assert headers.get("Retry-After") == "1", headers


async def test_execs_past_the_per_user_cap_are_refused_and_others_still_run(
    daemon: Daemon,
) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.75"
    name, other_name = unique("cap"), unique("capo")
    async with (
        ApiClient(daemon, daemon.token(unique("capu"))) as c,
        ApiClient(daemon, daemon.token(unique("capv"))) as o,
    ):
        try:
            await c.create_running(name)
            await o.create_running(other_name)
            held = [
                asyncio.ensure_future(c.exec(name, f"sleep {marker}", timeout_seconds=120))
                for _ in range(EXEC_CAP)
            ]
            await until_running(f"sleep\0{marker}", EXEC_CAP)
            r = await c.exec(name, "echo one too many")
            assert_concurrency_limited(r.status, r.body, r.headers)
            assert r.body["limit"] == EXEC_CAP and r.body["retry_after"] == 1, r.body
            # Another user has slots of its own.
            r = (await o.exec(other_name, "echo mine")).expect(200)
            assert r["stdout"] == "mine\n"
            # The slots free when the commands end.
            await c.post(f"/api/containers/{name}/stop", params={"timeout": "0"})
            await asyncio.wait_for(asyncio.gather(*held), scaled(60))
            await c.post(f"/api/containers/{name}/start")
            await c.wait_status(name, "running")
            assert await c.sh(name, "echo again") == "again\n"
        finally:
            await c.remove(name)
            await o.remove(other_name)


async def test_downloads_hold_a_file_slot_until_their_last_byte(daemon: Daemon) -> None:
    name = unique("capf")
    async with ApiClient(daemon, daemon.token(unique("capf"))) as c:
        try:
            await c.create_running(name)
            # Larger than every socket buffer between the daemon and an unread client.
            await c.sh(name, "dd if=/dev/zero of=/home/user/big bs=1M count=48 2>/dev/null")
            assert c.session is not None
            readers: list[aiohttp.ClientResponse] = []
            try:
                for _ in range(FILES_CAP):
                    resp = await c.session.get(
                        c.base + F.format(name),
                        params={"path": "/home/user/big"},
                        headers=c.auth(),
                    )
                    assert resp.status == 200
                    readers.append(resp)  # headers in, body left unread: still in flight
                r = await c.get(F.format(name) + "/list", params={"path": "/home/user"})
                assert_concurrency_limited(r.status, r.body, r.headers)
                r = await c.get(F.format(name), params={"path": "/etc/hostname"})
                assert_concurrency_limited(r.status, r.body, r.headers)
                # Reading one download to its end frees its slot.
                assert len(await readers.pop().read()) == 48 * 1024 * 1024

                async def listed() -> bool:
                    r = await c.get(F.format(name) + "/list", params={"path": "/home/user"})
                    return r.status == 200

                await apoll(listed, timeout=10, what="a file slot to free")
            finally:
                for resp in readers:
                    resp.close()
        finally:
            await c.remove(name)
