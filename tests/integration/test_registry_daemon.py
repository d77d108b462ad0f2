"""The daemon pulling on create from a real registry on loopback (Docker Hub mirrored
there, mirrors_only): the ``pulling`` stage and progress events, one download for ten
concurrent creates, images in use, admin pulls and removal, and the 400 for an image
that is neither local nor pullable."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest

from tests.deadlines import scaled
from tests.integration.daemon import Daemon, free_port
from tests.integration.daemon_fixtures import (
    ApiClient,
    cleaning,
    running_daemon,
    unique,
)
from tests.integration.registry import (
    Registry,
    busybox_rootfs,
    mirror_of_hub,
    push_image,
)
from tests.integration.registry import catalogue_entry as entry
from tests.unit.fakes.images import layer, reg

SIZES = {"memory_mb": 64, "disk_mb": 64, "cpu_shares": 250}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Daemon]:
    overrides = {
        "registries": mirror_of_hub(registry.host),
        "images": {
            "catalogue": [
                entry("tinybox:1", "docker.io/library/tinybox:1", aliases=["tiny"]),
                entry("crowd:1", "docker.io/library/crowd:1"),
                entry("localonly:1", "docker.io/library/localonly:1", pull=False),
                entry("custom", None, pull=False),
            ]
        },
    }
    with running_daemon(tmp_path_factory, overrides) as d:
        yield d


async def test_create_pulls_with_progress_then_image_is_in_use(
    daemon: Daemon, registry: Registry
) -> None:
    rootfs = busybox_rootfs()
    pushed = push_image(registry, "library/tinybox", "1", [rootfs, layer(reg("etc/motd", b"hi\n"))])
    user = unique("pull")
    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    async with ApiClient(daemon, daemon.token(user)) as c, cleaning(c) as refs:
        ws = await c.ws("/api/containers/events")
        assert (await ws.receive_json())["type"] == "list"
        name = unique("tb")
        refs.append(name)
        status, _, frames = await c.stream_create({"image": "tiny", "name": name, **SIZES})
        assert status == 200, frames
        stages = [f["stage"] for f in frames]
        assert frames[-1]["stage"] == "ready" and frames[-1]["complete"], frames[-1]
        pulling = [f for f in frames if f["stage"] == "pulling"]
        assert any("pulling docker.io/library/tinybox:1" in f["message"] for f in pulling)
        assert any(f["message"].startswith("pulled tinybox:1") for f in pulling)
        assert [f["progress"] for f in frames] == sorted(f["progress"] for f in frames)
        assert stages.index("pulling") < stages.index("creating") < stages.index("ready")
        assert await c.sh(name, "cat /etc/motd") == "hi\n"

        events = []
        while True:
            ev = json.loads((await asyncio.wait_for(ws.receive(), scaled(10))).data)
            events.append(ev)
            if ev["type"] == "started":
                break
        progress = [e for e in events if e["type"] == "progress"]
        assert progress and all(e["stage"] == "pulling" for e in progress)
        assert progress[0]["container"]["name"] == name
        await ws.close()

        local = (await c.get("/api/images/local")).expect(200).body["images"]
        (tiny,) = [i for i in local if i["name"] == "tinybox:1"]
        assert tiny["digest"] == pushed.digest and tiny["containers"] == 1

        r = (await c.delete("/api/images/local/tinybox:1", token=admin)).expect(409)
        assert "in use" in r["error"]
        await c.remove(name)
        refs.remove(name)
        r = (await c.delete("/api/images/local/tinybox:1", token=admin)).expect(200)
        # Its own layer goes; the busybox layer stays: the imported busybox:latest
        # (the same diff_id) still references it.
        assert r["layers_removed"] == 1
        layers = daemon.state / "images" / "layers"
        assert (layers / pushed.diff_ids[0][7:]).is_dir()
        assert not (layers / pushed.diff_ids[1][7:]).exists()


async def test_ten_concurrent_creates_one_download(daemon: Daemon, registry: Registry) -> None:
    extra = layer(reg("opt/blob.bin", os.urandom(2 << 20)))
    pushed = push_image(registry, "library/crowd", "1", [busybox_rootfs(), extra])
    token = daemon.token(unique("crowd"), tier="enterprise")
    async with ApiClient(daemon, token) as c, cleaning(c) as refs:
        names = [unique("cr") for _ in range(10)]
        refs.extend(names)
        replies = await asyncio.gather(*(c.create(n, image="crowd:1", **SIZES) for n in names))
        for r in replies:
            r.expect(202)
        for n in names:
            await c.wait_status(n, "running", timeout=120)
    # The busybox layer is local already (the imported test image): never fetched.
    # The new layer: one GET for the ten creates, as is the manifest.
    assert registry.blob_gets(pushed.blobs[0]) == 0
    assert registry.blob_gets(pushed.blobs[1]) == 1
    assert registry.log.read_text().count('"GET /v2/library/crowd/manifests/1 ') == 1


async def test_not_local_and_not_pullable_says_how_to_get_it(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("np"))) as c:
        r = (await c.create(unique(), image="localonly:1")).expect(400)
        assert "rexecd image pull docker.io/library/localonly:1" in r["error"]
        assert r["code"] == "unsupported_image"
        r = (await c.create(unique(), image="custom", custom_image="quay.io/x/y:1")).expect(400)
        assert r["error"] == "unsupported image type" and "rexecd image pull" in r["hint"]
        r = (await c.create(unique(), image="ubuntu")).expect(400)  # not in this catalogue
        assert "tinybox:1" in r["supported_images"]
        assert (await c.get("/api/containers")).expect(200)["count"] == 0


async def test_admin_pull_by_full_reference(daemon: Daemon, registry: Registry) -> None:
    push_image(registry, "team/tool", "v2", [busybox_rootfs()])
    writer = daemon.token(unique("w"))
    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    body = {"reference": f"{registry.host}/team/tool:v2", "name": "tool:2"}
    async with ApiClient(daemon, writer) as c, cleaning(c) as refs:
        (await c.post("/api/images/pull", body)).expect(403)
        r = (await c.post("/api/images/pull", body, token=admin)).expect(201)
        assert r["name"] == "tool:2" and r["layers"] == 1
        r = (
            await c.post(
                "/api/images/pull", {"reference": f"{registry.host}/team/nope:1"}, token=admin
            )
        ).expect(404)
        name = unique("tool")
        refs.append(name)
        await c.create_running(name, image="custom", custom_image="tool:2", **SIZES)
        assert await c.sh(name, "echo ok") == "ok\n"


@pytest.fixture
def dead_mirror_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    overrides = {
        # Nothing listens on the mirror's port.
        "registries": mirror_of_hub(f"127.0.0.1:{free_port()}", retries=1, connect_timeout_s=2),
        "images": {"catalogue": [entry("gone:1", "docker.io/library/gone:1")]},
    }
    with running_daemon(tmp_path_factory, overrides) as d:
        yield d


async def test_unreachable_mirror_fails_the_create_not_the_daemon(
    dead_mirror_daemon: Daemon,
) -> None:
    d = dead_mirror_daemon
    async with ApiClient(d, d.token(unique("un"))) as c, cleaning(c) as refs:
        name = unique("gone")
        refs.append(name)
        status, _, frames = await c.stream_create({"image": "gone:1", "name": name})
        assert status == 200
        assert frames[-1]["error"] and "unreachable" in frames[-1]["error"], frames[-1]
        rec = await c.container(name)
        assert rec["status"] == "error" and "unreachable" in rec["error_message"]
        assert (await c.get("/health")).status == 200


async def test_restart_drops_leases_of_containers_that_are_gone(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("lease"))) as c, cleaning(c) as refs:
        name = unique("keep")
        refs.append(name)
        kept = await c.create_running(name, **SIZES)
        leases = daemon.state / "images" / "leases"
        assert (leases / f"{kept['id']}.json").exists()
        # A lease whose container is gone (deleted while the daemon was down, say).
        stale = leases / f"{'e' * 64}.json"
        stale.write_bytes((leases / f"{kept['id']}.json").read_bytes())
        await asyncio.to_thread(daemon.restart)
        assert not stale.exists()
        assert (leases / f"{kept['id']}.json").exists()
        await c.remove(name)
        refs.remove(name)
        assert not (leases / f"{kept['id']}.json").exists()
