"""Roles that install, end to end and offline: debian:bookworm (scripts/build-debian-image)
with the shipped ``python`` role, its packages served from a local apt repository on the
test daemon's bridge gateway (the role's apt mirror). The first create installs in a
build container and caches the layer; the second starts from the cache (its stream says
so, no install runs); concurrent creates of an uncached pair share one build; a failing
install ends as ``error`` with its log's tail; ``barebone`` adds nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from rexecd.config import Config
from tests.deadlines import scaled
from tests.integration import aptrepo
from tests.integration.daemon import Daemon, free_port
from tests.integration.daemon_fixtures import ApiClient, apoll, cleaning, unique

ROOTFS = aptrepo.CACHE / "debian-bookworm" / "rootfs.tar"
SHIPPED = {r.id: r for r in Config().roles}
TEST_ROLES = [
    {
        "id": "broken",
        "name": "Broken",
        "description": "a package no repository has",
        "install": {"apt": ["rexecd-no-such-package"]},
    },
    {
        # An install that never ends: what a daemon crash in the middle leaves.
        "id": "endless",
        "name": "Endless",
        "description": "writes a file, then sleeps",
        "setup": ["touch /etc/rexecd-partial", "exec sleep 3517"],
    },
    {
        # No packages, only a setup step: quick, and it shows what the build saw.
        "id": "marker",
        "name": "Marker",
        "description": "records the build's environment",
        "setup": [
            "env > /etc/rexecd-build-env",
            "ls -A /home/user > /etc/rexecd-build-home 2>&1 || true",
        ],
    },
]
CREATE = {"image": "debian:bookworm", "memory_mb": 512, "disk_mb": 1536}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if not ROOTFS.exists():
        pytest.skip(f"{ROOTFS} not built: run scripts/build-debian-image (mmdebstrap)")
    repo = aptrepo.fetch("python", SHIPPED["python"].install["apt"])
    port = free_port()
    roles = [SHIPPED["python"].model_dump(), SHIPPED["barebone"].model_dump(), *TEST_ROLES]
    daemon = Daemon(
        tmp_path_factory.mktemp("rexecd"),
        overrides={"roles": roles, "network": {"gateway_tcp_ports": [port]}},
    )
    # The repository is served on the daemon's own bridge gateway: traffic stays on the
    # bridge this test made, and the container reaches it like an internal mirror.
    gateway = str(ipaddress.ip_network(daemon.subnet).network_address + 1)
    cfg = yaml.safe_load(daemon.config.read_text())
    cfg["packages"] = {"mirrors": {"apt": [f"deb [trusted=yes] http://{gateway}:{port}/ ./"]}}
    daemon.config.write_text(yaml.safe_dump(cfg))
    try:
        daemon.start()
        daemon.cli(
            "image", "import", "--state-dir", str(daemon.state), "--rootfs", str(ROOTFS),
            "--name", "debian:bookworm",
        )  # fmt: skip
        with aptrepo.serving(repo, gateway, port):
            yield daemon
    finally:
        daemon.close()


async def stream(c: ApiClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The frames of one streamed create, however long its install takes."""
    assert c.session is not None
    frames: list[dict[str, Any]] = []
    async with c.session.post(
        c.base + "/api/containers/stream",
        json=body,
        headers=c.auth(),
        timeout=aiohttp.ClientTimeout(total=scaled(900)),
    ) as r:
        assert r.headers.get("Content-Type", "").startswith("text/event-stream"), await r.text()
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                frames.append(json.loads(line[5:].strip()))
    return frames


def role_messages(frames: list[dict[str, Any]]) -> list[str]:
    return [f["message"] for f in frames if f["stage"] == "configuring" and "role " in f["message"]]


def log_of(d: Daemon, cid: str) -> Path:
    return d.state / "logs" / f"{cid}.log"


@pytest.mark.timeout(1800)
async def test_python_role_installs_once_then_starts_from_the_cached_layer(d: Daemon) -> None:
    async with ApiClient(d, d.token(unique("py"))) as c, cleaning(c) as refs:
        first, second = unique("py1"), unique("py2")
        refs += [first, second]
        frames = await stream(c, {**CREATE, "name": first, "role": "python"})
        assert frames[-1]["stage"] == "ready", frames[-1]
        msgs = role_messages(frames)
        assert any("installing on debian:bookworm (first use)" in m for m in msgs), msgs
        assert any(m.startswith("role python: installed in") for m in msgs), msgs
        assert (await c.sh(first, "python3 -c 'print(1)'")).strip() == "1"
        # The install's output is the container's log, where `rexec logs` reads it.
        cid = frames[-1]["container_id"]
        text = log_of(d, cid).read_text()
        assert "Setting up python3" in text and "rexecd: role python installed" in text

        frames = await stream(c, {**CREATE, "name": second, "role": "python"})
        assert frames[-1]["stage"] == "ready", frames[-1]
        msgs = role_messages(frames)
        # No install ran: the stream names the cached layer and nothing else.
        assert msgs == ["role python: cached layer, nothing to install"], msgs
        assert not log_of(d, frames[-1]["container_id"]).exists()
        assert (await c.sh(second, "python3 -c 'print(1)'")).strip() == "1"
        # The layer carries nothing of the first container: /etc/hosts is the second's.
        hosts = await c.sh(second, "cat /etc/hosts")
        assert second in hosts and first not in hosts
        # A restart keeps the role: the container's lease pins the role's layer.
        (await c.post(f"/api/containers/{second}/restart")).expect(200)
        await c.wait_status(second, "running")
        assert (await c.sh(second, "python3 -c 'print(2)'")).strip() == "2"
        # Deleting the container deletes its log.
        await c.remove(first)
        assert not log_of(d, cid).exists()


@pytest.mark.timeout(900)
async def test_concurrent_creates_of_a_pair_share_one_build(d: Daemon) -> None:
    async with ApiClient(d, d.token(unique("mk"), tier="pro")) as c, cleaning(c) as refs:
        names = [unique("mk") for _ in range(3)]
        refs += names
        results = await asyncio.gather(
            *(
                stream(c, {**CREATE, "name": n, "role": "marker", "environment": {"TENANT": n}})
                for n in names
            )
        )
        builds = 0
        for frames in results:
            assert frames[-1]["stage"] == "ready", frames[-1]
            builds += any("(first use)" in m for m in role_messages(frames))
        assert builds == 1, [role_messages(f) for f in results]
        for n in names:
            # Every container has the one build's result...
            env = await c.sh(n, "cat /etc/rexecd-build-env")
            # ...which saw nothing of any request: no tenant's environment or container
            # name (the build's hostname is neutral), no /home/user.
            assert "TENANT" not in env and not any(m in env for m in names), env
            assert "HOSTNAME=rexecd-build" in env
            # (minbase has no /home/user: only a bind of the tenant's volume would make one)
            assert "No such file" in await c.sh(n, "cat /etc/rexecd-build-home")


@pytest.mark.timeout(900)
async def test_failed_install_is_an_error_with_the_log_tail(d: Daemon) -> None:
    async with ApiClient(d, d.token(unique("br"))) as c, cleaning(c) as refs:
        name = unique("br")
        refs.append(name)
        frames = await stream(c, {**CREATE, "name": name, "role": "broken"})
        assert frames[-1].get("error"), frames[-1]
        rec = await c.container(name)
        assert rec["status"] == "error"
        # apt-get's own status, and the end of what it printed.
        assert "role broken: install failed (exit status 100)" in rec["error_message"]
        assert "Unable to locate package rexecd-no-such-package" in rec["error_message"]
        assert "rexecd-no-such-package" in log_of(d, frames[-1]["container_id"]).read_text()
        # Nothing of the failed build is cached: the next create tries again.
        retry = unique("br")
        refs.append(retry)
        again = await stream(c, {**CREATE, "name": retry, "role": "broken"})
        assert any("(first use)" in m for m in role_messages(again))


async def test_barebone_adds_nothing(d: Daemon) -> None:
    async with ApiClient(d, d.token(unique("bb"))) as c, cleaning(c) as refs:
        name = unique("bb")
        refs.append(name)
        frames = await stream(c, {**CREATE, "name": name, "role": "barebone"})
        assert frames[-1]["stage"] == "ready", frames[-1]
        assert role_messages(frames) == []
        assert not log_of(d, frames[-1]["container_id"]).exists()
        r = (await c.exec(name, "command -v python3")).expect(200)
        assert r["exit_code"] != 0  # the image as it is: minbase has no python


@pytest.mark.timeout(600)
async def test_daemon_crash_mid_install_leaves_nothing_of_it(d: Daemon) -> None:
    token = d.token(unique("cr"))
    name = unique("cr")
    async with ApiClient(d, token) as c:
        (await c.create(name, "debian:bookworm", role="endless", memory_mb=256)).expect(202)
        await c.wait_status(name, "configuring")
        await until_partial(d, name)
    d.restart(kill=True)
    async with ApiClient(d, token) as c, cleaning(c) as refs:
        refs.append(name)
        rec = await c.container(name)
        assert rec["status"] == "error" and "restarted during creation" in rec["error_message"]
        # The build's processes are gone with its cgroup...
        assert not [p for p in processes_named("sleep") if "3517" in p]
        # ...and a start runs the bare image: nothing the cut install wrote is there.
        (await c.post(f"/api/containers/{name}/start")).expect(200)
        r = (await c.exec(name, "test -e /etc/rexecd-partial")).expect(200)
        assert r["exit_code"] == 1


async def until_partial(d: Daemon, name: str) -> None:
    """Until the endless build is in its last step (its file written, sleep running)."""

    async def sleeping() -> bool:
        return any("3517" in p for p in processes_named("sleep"))

    await apoll(sleeping, 60, what=f"the endless install of {name} to reach its sleep")


def processes_named(comm: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                out.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return out
