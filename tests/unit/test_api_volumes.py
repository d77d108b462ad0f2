"""``GET /api/volumes`` and ``DELETE /api/volumes/{name}``: over HTTP, through the Python
SDK and as ``rexec volumes ls|rm``, against the real app and the real ``KeptVolumes``
over a real store (volumes as plain directories)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from rexecd.api import make_app
from rexecd.client.cli import main
from rexecd.client.sdk import ApiError, AsyncClient
from rexecd.config import Config, RateLimitsConfig
from rexecd.models import ContainerRecord, ContainerStatus, VolumeList
from rexecd.service import auth
from rexecd.service.auth import Principal
from rexecd.service.homes import PlainHomes
from rexecd.service.ratelimit import RateLimiter
from rexecd.service.store import Store
from rexecd.service.volumes import KeptVolumes
from tests.unit.fakes.daemon import ServerThread
from tests.unit.fakes.service import FakeService, Harness


class VolumeService(FakeService):
    """The fake service with the real volume rules: containers are stored too, since a
    volume is in use while a container of its name exists."""

    def __init__(self, cfg: Config, store: Store) -> None:
        super().__init__()
        self.store = store
        self.homes = PlainHomes(cfg, store, None)  # type: ignore[arg-type]
        self.volumes = KeptVolumes(cfg, store, self.homes)

    def add(self, user_id: str, name: str, status: ContainerStatus = "running") -> ContainerRecord:
        rec = super().add(user_id, name, status)
        self.store.insert_container_checked(rec, 100)
        self.keep(user_id, name)
        return rec

    def keep(self, user_id: str, name: str) -> None:
        home = self.homes.plain_dir(user_id, name)
        home.mkdir(parents=True, exist_ok=True)
        self.store.upsert_volume(user_id, name, str(home), 2048)

    async def list_volumes(self, p: Principal) -> VolumeList:
        return self.volumes.listing(p.user_id, p.tier)

    async def delete_volume(self, p: Principal, name: str) -> None:
        self.volumes.remove(p.user_id, name)


@asynccontextmanager
async def vol_harness(tmp_path: Path) -> AsyncIterator[tuple[Harness, VolumeService]]:
    cfg = Config(state_dir=tmp_path / "state")
    limiter = RateLimiter(
        RateLimitsConfig(create_per_min=1000, ops_per_min=1000, read_per_min=1000)
    )
    with Store(cfg.state_dir) as store:
        tokens = {
            "alice": auth.create_token(store, "alice", scopes=["read", "write"])[0],
            "alice-ro": auth.create_token(store, "alice", scopes=["read"])[0],
            "bob": auth.create_token(store, "bob")[0],
        }
        service = VolumeService(cfg, store)
        app = make_app(service, store, cfg, limiter, version="1.2.3", build="abc")
        async with TestClient(TestServer(app)) as client:
            yield Harness(client, service, store, cfg, limiter, tokens), service


async def test_list_shows_kept_and_in_use_volumes_with_the_caps(tmp_path: Path) -> None:
    async with vol_harness(tmp_path) as (h, svc):
        rec = svc.add(h.user_id(), "busy")
        svc.keep(h.user_id(), "kept")
        svc.keep(h.user_id("bob"), "bobs")
        resp = await h.client.get("/api/volumes", headers=h.headers())
        assert resp.status == 200
        body = await resp.json()
        assert {k: v for k, v in body.items() if k != "volumes"} == {
            "count": 2,
            "kept": 1,
            "kept_limit": 5,
            "kept_mb": 2048,
            "kept_mb_limit": 51200,
        }
        busy, kept = body["volumes"]
        assert set(busy) == {
            "name",
            "disk_mb",
            "used_bytes",
            "created_at",
            "last_used_at",
            "in_use",
            "container_id",
            "expires_at",
        }
        assert (busy["name"], busy["in_use"], busy["container_id"]) == ("busy", True, rec.id)
        assert busy["expires_at"] is None
        assert (kept["name"], kept["in_use"], kept["container_id"]) == ("kept", False, None)
        assert kept["disk_mb"] == 2048 and kept["expires_at"].endswith("Z")


async def test_delete_rules(tmp_path: Path) -> None:
    async with vol_harness(tmp_path) as (h, svc):
        svc.add(h.user_id(), "busy")
        svc.keep(h.user_id(), "kept")
        svc.keep(h.user_id("bob"), "bobs")
        resp = await h.client.delete("/api/volumes/busy", headers=h.headers())
        assert resp.status == 409 and "in use" in (await resp.json())["error"]
        for name in ("nope", "bobs", "..", "a%2Fb"):
            resp = await h.client.delete(f"/api/volumes/{name}", headers=h.headers())
            assert resp.status == 404, name
            assert "error" in await resp.json()
        resp = await h.client.delete("/api/volumes/kept", headers=h.headers("alice-ro"))
        assert resp.status == 403
        assert svc.homes.plain_dir(h.user_id(), "kept").exists()
        resp = await h.client.delete("/api/volumes/kept", headers=h.headers())
        assert resp.status == 200
        assert await resp.json() == {"message": "volume deleted", "name": "kept"}
        assert not svc.homes.plain_dir(h.user_id(), "kept").exists()
        assert h.store.get_volume(h.user_id("bob"), "bobs") is not None
        resp = await h.client.get("/api/volumes", headers=h.headers("alice-ro"))
        assert [v["name"] for v in (await resp.json())["volumes"]] == ["busy"]
        resp = await h.client.get("/api/volumes")
        assert resp.status == 401


async def test_openapi_documents_the_endpoints(tmp_path: Path) -> None:
    async with vol_harness(tmp_path) as (h, _svc):
        doc = await (await h.client.get("/api/openapi.json", headers=h.headers())).json()
        assert set(doc["paths"]["/api/volumes"]) == {"get"}
        assert set(doc["paths"]["/api/volumes/{name}"]) == {"delete"}
        delete = doc["paths"]["/api/volumes/{name}"]["delete"]
        assert {"200", "404", "409"} <= set(delete["responses"])
        assert "VolumeList" in doc["components"]["schemas"]


# --- the SDK and the CLI, against the same app served in a thread ---------------------


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[VolumeService]:
    cfg = Config(state_dir=tmp_path / "state")
    limiter = RateLimiter(RateLimitsConfig(read_per_min=1000, ops_per_min=1000))
    with Store(cfg.state_dir) as store:
        token = auth.create_token(store, "alice", scopes=["read", "write"])[0]
        service = VolumeService(cfg, store)
        app = make_app(service, store, cfg, limiter, version="1", build="x")
        with ServerThread(SimpleNamespace(app=app)) as host:  # type: ignore[arg-type]
            monkeypatch.setenv("REXEC_HOST", host)
            monkeypatch.setenv("REXEC_TOKEN", token)
            yield service


def test_sdk_lists_and_deletes(served: VolumeService) -> None:
    import asyncio

    uid = served.store.get_user_by_name("alice")
    assert uid is not None
    served.keep(uid.id, "home-1")
    served.add(uid.id, "busy")

    async def go() -> None:
        async with AsyncClient() as c:
            listed = await c.list_volumes()
            assert [v.name for v in listed.volumes] == ["busy", "home-1"]
            assert listed.kept == 1
            with pytest.raises(ApiError) as err:
                await c.delete_volume("busy")
            assert err.value.status == 409
            gone = await c.delete_volume("home-1")
            assert gone.name == "home-1"
            assert [v.name for v in (await c.list_volumes()).volumes] == ["busy"]

    asyncio.run(go())


def test_cli_volumes_ls_and_rm(served: VolumeService, capsys: pytest.CaptureFixture[str]) -> None:
    uid = served.store.get_user_by_name("alice")
    assert uid is not None
    served.keep(uid.id, "home-1")
    served.keep(uid.id, "home-2")
    served.add(uid.id, "busy")
    assert main(["volumes", "ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "SIZE", "USED", "IN", "USE", "LAST", "USED", "EXPIRES"]
    assert [line.split()[:4] for line in out[1:4]] == [
        ["busy", "2048M", "-", "yes"],
        ["home-1", "2048M", "-", "no"],
        ["home-2", "2048M", "-", "no"],
    ]
    assert out[4] == "kept: 2 of 5 volumes, 4096 of 51200 MB"
    assert main(["volumes", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 2
    assert main(["volumes", "rm", "home-1", "home-2"]) == 0
    assert capsys.readouterr().out == "home-1\nhome-2\n"
    assert main(["volumes", "rm", "busy"]) == 1
    assert "in use by container busy" in capsys.readouterr().err
    assert [v.name for v in served.store.list_volumes(uid.id)] == ["busy"]
