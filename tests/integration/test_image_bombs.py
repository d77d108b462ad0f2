"""Decompression bombs against a live daemon (images.unpack limits), from the two ways in:
a registry a catalogue entry names (a non-admin create pulls it; Debian's
docker-registry on loopback, Docker Hub mirrored there) and an admin's import. Each is
refused with 400 ``image_too_large`` (on create: the container ends ``error``) and
leaves nothing in the store: no layer, no temporary directory, no lease, no record."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, cleaning, running_daemon, unique
from tests.integration.registry import (
    Registry,
    catalogue_entry,
    mirror_of_hub,
    push_image,
)
from tests.unit.fakes.images import Bomb, layer, oci_archive, reg

LIMIT_MB = 4
SIZES = {"memory_mb": 64, "disk_mb": 64, "cpu_shares": 250}
SMALL = layer(reg("etc/os-release", b"ID=tiny\n"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Daemon]:
    overrides = {
        "registries": mirror_of_hub(registry.host),
        "images": {
            "unpack": {"max_image_mb": LIMIT_MB},
            "catalogue": [
                catalogue_entry("bomb:1", "docker.io/library/bomb:1"),
                catalogue_entry("declared:1", "docker.io/library/declared:1"),
            ],
        },
    }
    with running_daemon(tmp_path_factory, overrides) as d:
        yield d


def store_is_clean(d: Daemon, diff_id: str) -> None:
    images = d.state / "images"
    assert list((images / "tmp").iterdir()) == []
    assert not (images / "layers" / diff_id.partition(":")[2]).exists()
    assert not any(p.name.startswith("bomb") for p in (images / "images").iterdir())
    assert list((images / "leases").glob("*.json")) == []


def bomb_layer(mb: int = 64) -> bytes:
    """The plain tar of a layer of ``mb`` MiB of zeros (its gzip is ~300 KB)."""
    return gzip.decompress(Bomb(mb << 20).whole())


async def test_a_bomb_on_create_ends_the_container_in_error_and_leaves_nothing(
    daemon: Daemon, registry: Registry
) -> None:
    bomb = bomb_layer()
    pushed = push_image(registry, "library/bomb", "1", [SMALL, bomb])
    # Its blobs declare less than the limit: only unpacking can tell.
    assert sum(d["size"] for d in pushed.manifest["layers"]) < LIMIT_MB << 20
    user = daemon.token(unique("bomber"))  # read,write: no admin scope
    async with ApiClient(daemon, user) as c, cleaning(c) as refs:
        name = unique("bomb")
        refs.append(name)
        (await c.create(name, image="bomb:1", **SIZES)).expect(202)
        rec = await c.wait_status(name, "error", timeout=60)
        assert "max_image_mb" in rec["error_message"], rec
    store_is_clean(daemon, pushed.diff_ids[1])

    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    async with ApiClient(daemon, admin) as c:
        r = await c.post("/api/images/pull", {"reference": "docker.io/library/bomb:1"})
        r.expect(400)
        assert r["code"] == "image_too_large" and r["limit"] == "max_image_mb"
    store_is_clean(daemon, pushed.diff_ids[1])


async def test_a_manifest_declaring_too_much_is_refused_before_any_download(
    daemon: Daemon, registry: Registry
) -> None:
    noise = layer(reg("noise", os.urandom((LIMIT_MB + 1) << 20)))
    pushed = push_image(registry, "library/declared", "1", [noise])
    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    async with ApiClient(daemon, admin) as c:
        r = await c.post("/api/images/pull", {"reference": "docker.io/library/declared:1"})
        r.expect(400)
        assert r["code"] == "image_too_large" and "declare" in r["error"]
    assert registry.blob_gets(pushed.blobs[0]) == 0
    store_is_clean(daemon, pushed.diff_ids[0])


async def test_an_imported_bomb_is_refused_with_image_too_large(
    daemon: Daemon, tmp_path: Path
) -> None:
    data = oci_archive([SMALL, bomb_layer(16)], "zstd", ref="bomb:import")
    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    async with ApiClient(daemon, admin) as c:
        r = await c.post("/api/images/import", data=data)
        r.expect(400)
        assert r["code"] == "image_too_large" and r["limit"] == "max_image_mb"
        listed = (await c.get("/api/images/local")).expect(200).body["images"]
        assert "bomb:import" not in {i["name"] for i in listed}
    assert list((daemon.state / "images" / "tmp").iterdir()) == []
