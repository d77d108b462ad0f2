"""Pulls from a real registry on loopback (Debian's docker-registry), through the Puller
the daemon uses: manifests and indexes, mirrors, corrupted blobs, a registry that stops
mid-blob, token and basic auth, timeouts, and concurrent pulls of one image."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from rexecd.config import RegistriesConfig, UnpackLimits
from rexecd.errors import ImageError, ImageTooLarge, NotFound, RegistryError
from rexecd.runtime.images import ImageStore
from rexecd.service.registry import Puller, PullProgress
from tests.deadlines import scaled
from tests.integration.daemon import ROOT
from tests.integration.registry import (
    CutProxy,
    Registry,
    TokenServer,
    htpasswd,
    push_image,
    push_index,
    running_registry,
)
from tests.unit.fakes.images import Bomb, layer, reg

BASE = layer(reg("etc/os-release", b"ID=tiny\n"), reg("bin/sh", b"#!fake\n", mode=0o755))
TOP = layer(reg("app/hello.txt", b"hello\n"))


@pytest.fixture
def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    with running_registry(tmp_path / "registry") as r:
        yield r  # type: ignore[misc]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def mirrored(host: str, **extra: object) -> RegistriesConfig:
    """Docker Hub mirrored on loopback only: a test never reaches the real Hub."""
    return RegistriesConfig.model_validate(
        {"mirrors": {"docker.io": [host]}, "mirrors_only": True, **extra}
    )


async def pull(cfg: RegistriesConfig, store: ImageStore, ref: str, **kw: object) -> object:
    puller = Puller(cfg, store)
    try:
        return await puller.pull(ref, **kw)  # type: ignore[arg-type]
    finally:
        await puller.close()


def nothing_left(store: ImageStore) -> None:
    assert list(store.tmp_dir.iterdir()) == []
    assert store.list() == []


async def test_single_arch_manifest_through_a_mirror(registry: Registry, store: ImageStore) -> None:
    pushed = push_image(registry, "library/tiny", "1", [BASE, TOP])
    seen: list[PullProgress] = []
    puller = Puller(mirrored(registry.host), store)
    try:
        # No scheme given: HTTPS is tried first, then plain HTTP (loopback only).
        res = await puller.pull("tiny:1", progress=seen.append)
    finally:
        await puller.close()
    rec = res.record
    assert rec.ref == "tiny:1" and rec.digest == pushed.digest
    assert rec.layers == pushed.diff_ids and rec.config.cmd == ["sh"]
    assert res.layers_fetched == 2 and res.downloaded == sum(
        d["size"] for d in pushed.manifest["layers"]
    )
    assert res.source == f"mirror {registry.host}"
    base, top = store.layer_paths(store.get("docker.io/library/tiny:1"))
    assert (base / "etc/os-release").read_bytes() == b"ID=tiny\n"
    assert (top / "app/hello.txt").read_bytes() == b"hello\n"
    assert seen and seen[-1].done == seen[-1].total and seen[-1].layers_done == 2
    assert list(store.tmp_dir.iterdir()) == []

    # Again: the layers are there, nothing is downloaded.
    again = await pull(mirrored(f"http://{registry.host}"), store, "docker.io/library/tiny:1")
    assert again.layers_present == 2 and again.downloaded == 0  # type: ignore[attr-defined]
    assert all(registry.blob_gets(b) == 1 for b in pushed.blobs)


async def test_index_resolves_to_the_host_platform(registry: Registry, store: ImageStore) -> None:
    other = "arm64" if os.uname().machine == "x86_64" else "amd64"
    here = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    pushed = push_index(
        registry,
        "library/multi",
        "latest",
        {here: [BASE, layer(reg("arch", here.encode()))], other: [layer(reg("arch", b"x"))]},
    )
    res = await pull(mirrored(registry.host), store, "multi")
    rec = res.record  # type: ignore[attr-defined]
    assert rec.ref == "multi:latest" and rec.digest == pushed[here].digest
    assert (store.layer_paths(rec)[1] / "arch").read_bytes() == here.encode()
    assert registry.blob_gets(pushed[other].blobs[0]) == 0


async def test_registry_of_its_own_by_full_reference(registry: Registry, store: ImageStore) -> None:
    push_image(registry, "team/tool", "v2", [TOP], gzip_layers=False)
    cfg = RegistriesConfig()  # no mirror: the reference names the (loopback) registry
    res = await pull(cfg, store, f"{registry.host}/team/tool:v2", name="tool:2")
    assert res.record.ref == "tool:2"  # type: ignore[attr-defined]
    with pytest.raises(NotFound, match="not found"):
        await pull(cfg, store, f"{registry.host}/team/tool:missing")


async def test_corrupted_blob_is_rejected_and_leaves_nothing(
    registry: Registry, store: ImageStore
) -> None:
    big = layer(*(reg(f"d/f{i}", os.urandom(2048)) for i in range(200)))
    pushed = push_image(registry, "library/bad", "1", [BASE, big])
    blob = registry.blob_file(pushed.blobs[1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the digest can tell
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        await pull(mirrored(registry.host), store, "bad:1")
    assert "gzip" in info.value.message or "digest mismatch" in info.value.message
    nothing_left(store)
    assert not (store.layers_dir / pushed.diff_ids[1][7:]).exists()


async def test_registry_stopping_mid_blob_is_resumed(tmp_path: Path, store: ImageStore) -> None:
    registry = Registry(tmp_path / "registry")
    registry.start()
    proxy = CutProxy(registry.port)
    await proxy.start()
    try:
        big = layer(reg("big.bin", os.urandom(6 << 20)))
        pushed = push_image(registry, "library/big", "1", [big], gzip_layers=False)
        size = pushed.manifest["layers"][0]["size"]
        proxy.hold_after(3 << 20)  # responses, headers included: about 3 MiB into the blob
        cfg = mirrored(f"http://{proxy.host}", retries=8)
        task = asyncio.ensure_future(pull(cfg, store, "big:1"))
        await asyncio.wait_for(proxy.held.wait(), scaled(30))
        registry.stop()  # the registry dies with the blob half sent
        proxy.drop()
        await asyncio.sleep(0.5)  # the client's first retries meet a dead registry
        registry.start()
        res = await asyncio.wait_for(task, scaled(60))
    finally:
        await proxy.close()
        registry.stop()
    assert res.record.layers == pushed.diff_ids  # type: ignore[attr-defined]
    assert res.resumed and res.resumed[0][1] > 1 << 20  # type: ignore[attr-defined]
    # Each byte came once: the rest was asked for from where it stopped.
    assert res.downloaded == size  # type: ignore[attr-defined]
    assert any(r.startswith("bytes=") and int(r[6:].rstrip("-")) > 1 << 20 for r in proxy.ranges())
    (root,) = store.layer_paths(res.record)  # type: ignore[attr-defined]
    assert (root / "big.bin").stat().st_size == 6 << 20


async def test_token_auth_anonymous_pull(tmp_path: Path, store: ImageStore) -> None:
    tokens = TokenServer(tmp_path)
    await tokens.start()
    registry = Registry(tmp_path / "registry")
    try:
        registry.start()  # open while the test pushes...
        push_image(registry, "library/tok", "1", [BASE])
        registry.stop()
        registry.start(auth=tokens.registry_auth())  # ...then bearer tokens only
        res = await pull(mirrored(registry.host), store, "tok:1")
    finally:
        registry.stop()
        await tokens.close()
    assert res.record.ref == "tok:1"  # type: ignore[attr-defined]
    scopes = {r["scope"] for r in tokens.requests}
    assert scopes == {"repository:library/tok:pull"}
    assert all(r["auth"] == "" for r in tokens.requests)  # anonymous
    # One token for the whole pull: cached, not asked for per request.
    assert len(tokens.requests) == 1


async def test_basic_auth_with_credentials_from_config(tmp_path: Path, store: ImageStore) -> None:
    registry = Registry(tmp_path / "registry")
    try:
        registry.start()
        push_image(registry, "library/priv", "1", [BASE])
        registry.stop()
        registry.start(auth=htpasswd(tmp_path / "htpasswd", "alice", "s3cret"))
        with pytest.raises(RegistryError, match="requires a login"):
            await pull(mirrored(registry.host), store, "priv:1")
        secret = tmp_path / "pw"
        secret.write_text("s3cret\n")
        wrong = {"docker.io": {"username": "alice", "password": "nope"}}
        with pytest.raises(RegistryError, match="denied"):
            await pull(mirrored(registry.host, credentials=wrong), store, "priv:1")
        good = {"docker.io": {"username": "alice", "password_file": str(secret)}}
        res = await pull(mirrored(registry.host, credentials=good), store, "priv:1")
    finally:
        registry.stop()
    assert res.record.ref == "priv:1"  # type: ignore[attr-defined]


async def test_unreachable_and_silent_registries_fail_in_time(
    tmp_path: Path, store: ImageStore
) -> None:
    closed = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(RegistryError, match="unreachable"):
        await pull(mirrored(closed, retries=1), store, "x:1")
    assert time.monotonic() - start < scaled(10)

    # A server that accepts and never answers: the read timeout ends it.
    async def silent(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = mirrored(f"http://127.0.0.1:{port}", retries=0, read_timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(RegistryError, match="timed out"):
            await pull(cfg, store, "x:1")
        assert time.monotonic() - start < scaled(10)
    finally:
        server.close()
    nothing_left(store)


async def test_concurrent_pulls_share_one_download(registry: Registry, store: ImageStore) -> None:
    shared = layer(*(reg(f"s/f{i}", os.urandom(4096)) for i in range(100)))
    a = push_image(registry, "library/conc", "a", [shared, TOP])
    b = push_image(registry, "library/conc", "b", [shared, BASE])
    puller = Puller(mirrored(registry.host), store)
    try:
        results = await asyncio.gather(
            *(puller.pull("conc:a") for _ in range(10)), puller.pull("conc:b")
        )
    finally:
        await puller.close()
    assert {r.record.ref for r in results} == {"conc:a", "conc:b"}
    for blob in {*a.blobs, *b.blobs}:
        assert registry.blob_gets(blob) == 1, blob


def _closed_port() -> int:
    from tests.integration.daemon import free_port

    return free_port()  # bound and released: nothing listens there now


def test_cli_pull_prints_progress_and_result(tmp_path: Path, registry: Registry) -> None:
    pushed = push_image(registry, "library/clip", "1", [BASE, TOP])
    cfg = tmp_path / "rexecd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"registries": {"mirrors": {"docker.io": [registry.host]}, "mirrors_only": True}}
        )
    )
    state = tmp_path / "state"
    out = subprocess.run(
        [sys.executable, "-m", "rexecd.cli", "image", "pull", "--config", str(cfg),
         "--state-dir", str(state), "clip:1", "--name", "clip:one"],
        capture_output=True, text=True, timeout=scaled(60), cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["name"] == "clip:one" and doc["digest"] == pushed.digest
    assert doc["layers_fetched"] == 2
    # Not a terminal: plain progress lines, the last at 100%.
    lines = [line for line in out.stderr.splitlines() if "% docker.io/library/clip:1" in line]
    assert lines and lines[-1].startswith("100%") and "2/2 layers" in lines[-1]
    assert ImageStore(state / "images").get("clip:one").layers == pushed.diff_ids


async def test_a_layer_bomb_fails_the_pull_and_leaves_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    # 64 MiB of zeros in ~300 KB of gzip, past a 4 MiB images.unpack.max_image_mb: the
    # download stops there (the other layer may be complete: it stays unreferenced).
    store = ImageStore(tmp_path / "limited", limits=UnpackLimits(max_image_mb=4))
    bomb = gzip.decompress(Bomb(64 << 20).whole())
    pushed = push_image(registry, "library/bomb", "1", [BASE, bomb])
    with pytest.raises(ImageTooLarge) as info:
        await pull(mirrored(registry.host), store, "bomb:1")
    assert info.value.extra["limit"] == "max_image_mb"
    assert f"layer {pushed.blobs[1][:19]}" in info.value.message
    nothing_left(store)
    assert not (store.layers_dir / pushed.diff_ids[1][7:]).exists()
