"""Concurrency and rollback on a real daemon: parallel creates against the container
limit, a name race, delete during create, and a create that fails in the container
child, each leaving no cgroup, veth, mount or IP lease behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    bridge_ports,
    cleaning,
    leases,
    leftovers,
    poll,
    running_daemon,
    unique,
    write_proc_symlink_image,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def assert_clean(d: Daemon, containers: list[dict[str, Any]], ports_before: set[str]) -> None:
    """Nothing of ``containers`` (deleted or failed) is left on the host."""
    for c in containers:
        assert poll(lambda c=c: leftovers(d, c) == {}, 10, what="cleanup") is True, leftovers(d, c)
    assert set(bridge_ports(d)) <= ports_before
    ids = {c["db_id"] for c in containers}
    assert not [row for row in leases(d) if row[1] in ids]


async def test_parallel_creates_stop_at_the_container_limit(daemon: Daemon) -> None:
    tok = daemon.token(unique("par"))  # free tier: 5 containers
    names = [unique(f"p{i}") for i in range(20)]
    ports_before = set(bridge_ports(daemon))
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        refs.extend(names)
        replies = await asyncio.gather(*(c.create(n) for n in names))
        statuses = sorted(r.status for r in replies)
        assert statuses == [202] * 5 + [403] * 15, statuses
        for r in replies:
            if r.status == 403:
                assert r["error"] == "container limit reached"
                assert (r["limit"], r["tier"]) == (5, "free") and r["current"] == 5
        made = [r.body for r in replies if r.status == 202]
        running = await asyncio.gather(*(c.wait_status(m["id"], "running") for m in made))
        ips = {x["ip_address"] for x in running}
        assert len(ips) == 5 and None not in ips
        outs = await asyncio.gather(*(c.sh(m["name"], "hostname") for m in made))
        assert sorted(o.strip() for o in outs) == sorted(m["name"] for m in made)
        listing = (await c.get("/api/containers")).expect(200).body
        assert listing["count"] == 5

        deleted = await asyncio.gather(
            *(c.delete(f"/api/containers/{m['id']}?volumes=true") for m in made)
        )
        assert [r.status for r in deleted] == [200] * 5
        for m in made:
            (await c.get(f"/api/containers/{m['id']}")).expect(404)
        assert (await c.get("/api/containers")).expect(200)["count"] == 0
        assert_clean(daemon, running, ports_before)


async def test_two_creates_with_one_name_give_one_202_one_409(daemon: Daemon) -> None:
    tok = daemon.token(unique("race"), tier="pro")
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        for round_ in range(5):
            name = unique(f"same{round_}")
            refs.append(name)
            a, b = await asyncio.gather(c.create(name), c.create(name))
            assert sorted((a.status, b.status)) == [202, 409], (a.body, b.body)
            loser = a if a.status == 409 else b
            assert loser["error"] == "container with this name already exists"
            assert loser["name"] == name
        listing = (await c.get("/api/containers")).expect(200).body
        assert listing["count"] == 5
        for x in listing["containers"]:
            await c.wait_status(x["id"], "running")


async def test_delete_during_create_leaves_nothing(daemon: Daemon) -> None:
    ports_before = set(bridge_ports(daemon))
    async with ApiClient(daemon, daemon.token(unique("dd"))) as c:
        made = []
        for _ in range(3):
            r = (await c.create(unique("dd"))).expect(202)
            made.append(r.body)
            (await c.delete(f"/api/containers/{r['id']}?volumes=true")).expect(200)
            (await c.get(f"/api/containers/{r['id']}")).expect(404)
        assert_clean(daemon, made, ports_before)


async def test_parallel_execs_in_one_container(daemon: Daemon) -> None:
    name = unique("pe")
    async with ApiClient(daemon, daemon.token(unique("pe"))) as c, cleaning(c) as refs:
        refs.append(name)
        await c.create_running(name)
        outs = await asyncio.gather(
            *(c.sh(name, f"echo {i}; sleep 0.2; echo {i}") for i in range(12))
        )
        assert outs == [f"{i}\n{i}\n" for i in range(12)]


async def test_racing_operations_on_one_container_never_fail_the_server(
    daemon: Daemon,
) -> None:
    """stop, delete, restart, exec and settings at once: each answers 2xx, 404 or 409,
    never a 5xx, and what is left afterwards is consistent and clean."""
    ports_before = set(bridge_ports(daemon))
    async with ApiClient(daemon, daemon.token(unique("mix"), tier="pro")) as c, cleaning(c) as refs:
        gone = []
        for i in range(4):
            name = unique(f"mix{i}")
            refs.append(name)
            obj = await c.create_running(name)
            base = f"/api/containers/{name}"
            ops = [
                c.post(f"{base}/stop"),
                c.exec(name, "echo hi"),
                c.post(f"{base}/restart"),
                c.patch(f"{base}/settings", {"memory_mb": 100 + i}),
                c.exec(name, "sleep 0.2; echo late"),
            ]
            if i % 2 == 0:
                ops.append(c.delete(f"{base}?volumes=true"))
            replies = await asyncio.gather(*ops)
            codes = [r.status for r in replies]
            assert all(code in (200, 404, 409) for code in codes), [
                (r.status, r.body) for r in replies
            ]
            for r in (replies[1], replies[4]):  # the execs
                if r.status == 200:
                    assert r["stdout"] in ("hi\n", "late\n", "") and r["exit_code"] in (0, 143, 137)
            if i % 2 == 0:
                (await c.get(base)).expect(404)
                gone.append(obj)
            else:
                state = await c.container(name)
                assert state["status"] in ("running", "stopped"), state
                if state["status"] == "running":
                    assert await c.sh(name, "echo ok") == "ok\n"
        assert_clean(daemon, gone, ports_before | set(bridge_ports(daemon)))


@pytest.fixture(scope="module")
def broken_image(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``brokenproc``, imported over the API: its /proc is a symlink to /etc, so the
    container child refuses at its "mount /proc and /sys" step."""
    image = write_proc_symlink_image(tmp_path_factory.mktemp("img") / "broken.tar")
    admin = daemon.token(unique("adm"), scopes="read,write,admin")

    async def upload() -> None:
        async with ApiClient(daemon, admin) as c:
            r = await c.post(
                "/api/images/import",
                params={"name": "brokenproc:latest"},
                data=image.read_bytes(),
            )
            r.expect(201)

    asyncio.run(upload())
    return "brokenproc"


async def test_failed_create_is_error_and_leaves_nothing(daemon: Daemon, broken_image: str) -> None:
    tok = daemon.token(unique("fail"))
    ports_before = set(bridge_ports(daemon))
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("broken")
        refs.append(name)
        created = (await c.create(name, image=broken_image)).expect(202).body
        failed = await c.wait_status(name, "error")
        assert failed.get("error_message"), failed
        # The whole failure is rolled back: no cgroup, veth, mount, lease or run dir.
        assert_clean(daemon, [created], ports_before)
        assert failed.get("ip_address") in (None, "")
        (await c.exec(name, "true")).expect(409)

        # The stream variant ends with an error frame, never "ready".
        name2 = unique("broken2")
        refs.append(name2)
        status, _, frames = await c.stream_create({"image": broken_image, "name": name2})
        assert status == 200
        last = frames[-1]
        assert last.get("error") and not last.get("complete"), frames
        assert all(f["stage"] != "ready" for f in frames)
        second = await c.container(name2)
        assert second["status"] == "error"
        assert_clean(daemon, [second], ports_before)

        # Starting it again fails the same way, and still leaves nothing.
        r = await c.post(f"/api/containers/{name}/start")
        assert r.status >= 400, r.body
        assert_clean(daemon, [created], ports_before)

        # Deleting failed containers works and leaves nothing either.
        for n in (name, name2):
            (await c.delete(f"/api/containers/{n}?volumes=true")).expect(200)
        assert_clean(daemon, [created, second], ports_before)
        # A good image still works for this user afterwards.
        ok = unique("ok")
        refs.append(ok)
        await c.create_running(ok)


async def test_failed_create_names_the_failing_step(daemon: Daemon, broken_image: str) -> None:
    async with ApiClient(daemon, daemon.token(unique("step"))) as c, cleaning(c) as refs:
        name = unique("step")
        refs.append(name)
        (await c.create(name, image=broken_image)).expect(202)
        failed = await c.wait_status(name, "error")
        assert "mount /proc" in (failed.get("error_message") or ""), failed
