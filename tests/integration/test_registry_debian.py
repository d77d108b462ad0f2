"""A real distribution end to end: debian:bookworm built by scripts/build-debian-image
(mmdebstrap), pushed into a loopback registry with skopeo, created by its alias
through the daemon's default catalogue (Docker Hub mirrored on loopback), and the same
tree imported as a plain rootfs tarball."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deadlines import scaled
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, cleaning, running_daemon, unique
from tests.integration.registry import Registry, mirror_of_hub, running_registry

CACHE = Path(os.environ.get("REXECD_TEST_CACHE", "/var/cache/rexecd-test")) / "debian-bookworm"
OCI = CACHE / "oci"
ROOTFS = CACHE / "rootfs.tar"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not (OCI / "index.json").exists() or not ROOTFS.exists():
        pytest.skip(f"{CACHE} not built: run scripts/build-debian-image (mmdebstrap, ~1 min)")
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (Debian package skopeo)")
    with running_registry(tmp_path_factory.mktemp("registry")) as r:
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{OCI}:bookworm",
             f"docker://{r.host}/library/debian:bookworm"],
            check=True, capture_output=True, timeout=scaled(300),
        )  # fmt: skip
        yield r


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory, {"registries": mirror_of_hub(registry.host)}) as d:
        yield d


async def test_debian_by_alias_from_the_default_catalogue(daemon: Daemon) -> None:
    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    async with ApiClient(daemon, daemon.token(unique("deb"))) as c, cleaning(c) as refs:
        images = {i["name"]: i for i in (await c.get("/api/images")).expect(200)["images"]}
        assert images["debian:bookworm"]["available"] and not images["debian:bookworm"]["local"]
        name = unique("deb")
        refs.append(name)
        status, _, frames = await c.stream_create(
            {"image": "debian", "name": name, "memory_mb": 128, "disk_mb": 256}
        )
        assert status == 200 and frames[-1]["stage"] == "ready", frames[-1]
        assert any(f["message"].startswith("pulled debian:bookworm") for f in frames)
        assert (await c.sh(name, "cat /etc/debian_version")).startswith("12.")
        assert "apt " in await c.sh(name, "apt-get --version | head -1")
        local = {i["name"]: i for i in (await c.get("/api/images/local")).expect(200)["images"]}
        pulled = local["debian:bookworm"]

    # The tarball mmdebstrap wrote, imported as a plain rootfs: the very same layer.
    out = daemon.cli(
        "image", "import", "--state-dir", str(daemon.state), "--rootfs", str(ROOTFS),
        "--name", "debian-rootfs:12",
    )  # fmt: skip
    assert '"layers": 1' in out
    async with ApiClient(daemon, admin) as c:
        local = {i["name"]: i for i in (await c.get("/api/images/local")).expect(200)["images"]}
    assert local["debian-rootfs:12"]["layers"] == pulled["layers"]
