"""Port-forward endpoints and their rules (limit, range, conflicts, stop, restart), against
the real ``PortForwards`` over a real store, with an in-memory stand-in for nftables."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from rexecd.api import make_app
from rexecd.config import Config, NetworkConfig, RateLimitsConfig
from rexecd.errors import Conflict
from rexecd.models import (
    ContainerOut,
    ContainerRecord,
    ContainerStatus,
    PortForwardCreate,
    PortForwardOut,
)
from rexecd.runtime.network.models import PortForward
from rexecd.service import auth
from rexecd.service.auth import Principal
from rexecd.service.optional import NullForwarder
from rexecd.service.portforwards import PortForwards
from rexecd.service.ratelimit import RateLimiter
from rexecd.service.store import Store
from tests.unit.fakes.service import FakeService, Harness

LO, HI = 20000, 20019


class FakeForwarder:
    """``PortForwarder``'s contract in memory: ``busy`` ports are bound by host processes."""

    def __init__(self) -> None:
        self.map: dict[tuple[str, int], tuple[str, int]] = {}
        self.busy: set[tuple[str, int]] = set()

    def add(
        self, host_port: int, container_ip: str, container_port: int, proto: str = "tcp"
    ) -> PortForward:
        key, target = (proto, host_port), (container_ip, container_port)
        current = self.map.get(key)
        if current is not None and current != target:
            raise Conflict(
                f"{proto} port {host_port} already forwards to {current[0]}:{current[1]}"
            )
        if current is None and key in self.busy:
            raise Conflict(f"{proto} port {host_port} is in use on 127.0.0.1")
        self.map[key] = target
        return PortForward.model_validate(
            {
                "proto": proto,
                "host_port": host_port,
                "container_ip": container_ip,
                "container_port": container_port,
            }
        )

    def remove(self, host_port: int, proto: str = "tcp") -> bool:
        return self.map.pop((proto, host_port), None) is not None

    def list(self) -> list[PortForward]:
        return [
            PortForward.model_validate(
                {"proto": p, "host_port": hp, "container_ip": ip, "container_port": cp}
            )
            for (p, hp), (ip, cp) in sorted(self.map.items())
        ]


class ForwardingService(FakeService):
    """The fake service with real port-forward rules: containers are stored too, since
    forwards reference them, and stopping one releases its forwards like the manager."""

    def __init__(self, cfg: Config, store: Store, forwarder: FakeForwarder | NullForwarder) -> None:
        super().__init__()
        self.store = store
        self.forwards = PortForwards(cfg, store, forwarder)
        self._next_ip = 2

    def add(self, user_id: str, name: str, status: ContainerStatus = "running") -> ContainerRecord:
        rec = super().add(user_id, name, status)
        rec.ip_address = f"10.99.0.{self._next_ip}"
        rec.pid = 4242 if status == "running" else None
        self._next_ip += 1
        self.store.insert_container_checked(rec, 100)
        return rec

    async def stop_container(self, p: Principal, ref: str, timeout: float | None) -> ContainerOut:
        rec = self._find(p, ref)
        self.forwards.release(rec)
        rec.pid = None
        return await super().stop_container(p, ref, timeout)

    async def add_port_forward(
        self, p: Principal, ref: str, req: PortForwardCreate
    ) -> PortForwardOut:
        return self.forwards.add(self._find(p, ref), p.tier, req)

    async def list_port_forwards(self, p: Principal, ref: str) -> list[PortForwardOut]:
        return self.forwards.for_container(self._find(p, ref))

    async def delete_port_forward(self, p: Principal, ref: str, forward_id: str) -> PortForwardOut:
        return self.forwards.remove(self._find(p, ref), forward_id)


@asynccontextmanager
async def pf_harness(
    tmp_path: Path, *, networking: bool = True, lo: int = LO, hi: int = HI
) -> AsyncIterator[tuple[Harness, ForwardingService, FakeForwarder]]:
    cfg = Config(
        state_dir=tmp_path / "state",
        network=NetworkConfig(enabled=networking, port_forward_min=lo, port_forward_max=hi),
    )
    limiter = RateLimiter(
        RateLimitsConfig(create_per_min=1000, ops_per_min=1000, read_per_min=1000)
    )
    forwarder = FakeForwarder()
    with Store(cfg.state_dir) as store:
        tokens = {
            "alice": auth.create_token(store, "alice", scopes=["read", "write"])[0],
            "alice-ro": auth.create_token(store, "alice", scopes=["read"])[0],
            "bob": auth.create_token(store, "bob")[0],
            "guest": auth.create_token(store, "gina", tier="guest")[0],
        }
        service = ForwardingService(cfg, store, forwarder if networking else NullForwarder())
        app = make_app(service, store, cfg, limiter, version="1.2.3", build="abc")
        async with TestClient(TestServer(app)) as client:
            yield Harness(client, service, store, cfg, limiter, tokens), service, forwarder


def _pf(ref: str) -> str:
    return f"/api/containers/{ref}/port-forwards"


async def _post(h: Harness, ref: str, body: Any, who: str = "alice") -> tuple[int, Any]:
    resp = await h.client.post(_pf(ref), json=body, headers=h.headers(who))
    return resp.status, await resp.json()


async def test_create_list_delete(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, fwd):
        rec = svc.add(h.user_id(), "web")
        status, body = await _post(h, "web", {"container_port": 8080})
        assert status == 201, body
        assert set(body) == {
            "id",
            "container_id",
            "container_port",
            "host_port",
            "protocol",
            "host",
            "created_at",
        }
        assert body["container_id"] == rec.id and body["container_port"] == 8080
        assert body["protocol"] == "tcp" and body["host"] == "127.0.0.1"
        assert LO <= body["host_port"] <= HI
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["created_at"])
        assert fwd.map == {("tcp", body["host_port"]): (rec.ip_address, 8080)}

        resp = await h.client.get(_pf(rec.db_id), headers=h.headers())
        assert resp.status == 200
        assert await resp.json() == {"port_forwards": [body], "count": 1}

        resp = await h.client.delete(f"{_pf(rec.id)}/{body['id']}", headers=h.headers())
        assert resp.status == 200
        assert await resp.json() == {
            "message": "port forward deleted",
            "id": body["id"],
            "container_id": rec.id,
            "host_port": body["host_port"],
            "protocol": "tcp",
        }
        assert fwd.map == {}
        resp = await h.client.delete(f"{_pf(rec.id)}/{body['id']}", headers=h.headers())
        assert resp.status == 404
        assert (await resp.json())["code"] == "port_forward_not_found"
        resp = await h.client.get(_pf("web"), headers=h.headers())
        assert await resp.json() == {"port_forwards": [], "count": 0}


async def test_explicit_host_port_range_and_conflicts(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, fwd):
        svc.add(h.user_id(), "a")
        svc.add(h.user_id("bob"), "b")
        status, body = await _post(h, "a", {"container_port": 80, "host_port": LO + 3})
        assert status == 201 and body["host_port"] == LO + 3
        # The same host port is one forward daemon-wide, whoever asks.
        status, body = await _post(h, "b", {"container_port": 80, "host_port": LO + 3}, "bob")
        assert status == 409, body
        assert body["error"] == f"host port {LO + 3}/tcp is already in use"
        # ... but tcp and udp are separate ports.
        status, body = await _post(
            h, "b", {"container_port": 53, "host_port": LO + 3, "protocol": "udp"}, "bob"
        )
        assert status == 201 and body["protocol"] == "udp"
        for outside in (LO - 1, HI + 1, 80):
            status, body = await _post(h, "a", {"container_port": 80, "host_port": outside})
            assert status == 400, body
            assert body["error"] == f"host_port {outside} is outside the allowed range {LO}-{HI}"
            assert body["allowed_range"] == [LO, HI]
        # Bound by a host process: refused without naming what holds it.
        fwd.busy.add(("tcp", LO + 5))
        status, body = await _post(h, "a", {"container_port": 80, "host_port": LO + 5})
        assert status == 409 and body["error"] == f"host port {LO + 5}/tcp is already in use"
        # A stale element pointing at another tenant's address is not revealed either.
        fwd.map[("tcp", LO + 6)] = ("10.99.0.77", 22)
        status, body = await _post(h, "a", {"container_port": 80, "host_port": LO + 6})
        assert status == 409 and "10.99.0.77" not in str(body)
        # host_port 0 means "choose one", like other zero values clients send.
        status, body = await _post(h, "a", {"container_port": 81, "host_port": 0})
        assert status == 201 and body["host_port"] not in (LO + 3, LO + 5, LO + 6)


async def test_automatic_choice_skips_busy_ports_and_reports_exhaustion(tmp_path: Path) -> None:
    async with pf_harness(tmp_path, lo=LO, hi=LO + 2) as (h, svc, fwd):
        svc.add(h.user_id(), "a")
        fwd.busy.add(("tcp", LO + 1))
        got = set()
        for _ in range(2):
            status, body = await _post(h, "a", {"container_port": 80})
            assert status == 201, body
            got.add(body["host_port"])
        assert got == {LO, LO + 2}
        status, body = await _post(h, "a", {"container_port": 80})
        assert status == 503, body
        assert body["error"] == f"no free host port for tcp in {LO}-{LO + 2}"
        assert len(fwd.map) == 2


async def test_tier_limit_per_container(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, _fwd):
        svc.add(h.user_id(), "a")
        svc.add(h.user_id(), "other")
        for port in range(1, 6):
            status, body = await _post(h, "a", {"container_port": port})
            assert status == 201, body
        status, body = await _post(h, "a", {"container_port": 6})
        assert status == 403
        assert body == {
            "error": "port forward limit reached",
            "code": "quota_exceeded",
            "current": 5,
            "limit": 5,
            "tier": "free",
        }
        # The limit is per container.
        status, _ = await _post(h, "other", {"container_port": 6})
        assert status == 201
        svc.add(h.user_id("gina"), "g")
        for port in (1, 2):
            assert (await _post(h, "g", {"container_port": port}, "guest"))[0] == 201
        status, body = await _post(h, "g", {"container_port": 3}, "guest")
        assert status == 403 and body["limit"] == 2 and body["tier"] == "guest"


async def test_state_and_ownership(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, _fwd):
        svc.add(h.user_id(), "stopped", status="stopped")
        status, body = await _post(h, "stopped", {"container_port": 80})
        assert status == 409 and body["code"] == "container_stopped"
        nonet = svc.add(h.user_id(), "nonet")
        nonet.ip_address = None
        status, body = await _post(h, "nonet", {"container_port": 80})
        assert status == 409 and body["code"] == "no_network"

        bobs = svc.add(h.user_id("bob"), "bobs")
        status, body = await _post(h, "bobs", {"container_port": 80}, "bob")
        assert status == 201
        fid = body["id"]
        # Another user's container is unknown, whichever way it is named.
        for ref in ("bobs", bobs.id, bobs.db_id):
            assert (await _post(h, ref, {"container_port": 80}))[0] == 404
            resp = await h.client.get(_pf(ref), headers=h.headers())
            assert resp.status == 404
            resp = await h.client.delete(f"{_pf(ref)}/{fid}", headers=h.headers())
            assert resp.status == 404
        # A forward id of one container cannot be deleted through another.
        svc.add(h.user_id("bob"), "bobs2")
        resp = await h.client.delete(f"{_pf('bobs2')}/{fid}", headers=h.headers("bob"))
        assert resp.status == 404
        resp = await h.client.get(_pf("bobs"), headers=h.headers("bob"))
        assert (await resp.json())["count"] == 1


async def test_scopes(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, _fwd):
        svc.add(h.user_id(), "a")
        status, body = await _post(h, "a", {"container_port": 80}, "alice-ro")
        assert status == 403 and body["required_scope"] == "write"
        resp = await h.client.get(_pf("a"), headers=h.headers("alice-ro"))
        assert resp.status == 200
        resp = await h.client.get(_pf("a"))
        assert resp.status == 401


async def test_invalid_bodies(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, fwd):
        svc.add(h.user_id(), "a")
        for body, loc in (
            ({}, ["container_port"]),
            ({"container_port": 0}, ["container_port"]),
            ({"container_port": 65536}, ["container_port"]),
            ({"container_port": 80, "host_port": -1}, ["host_port"]),
            ({"container_port": 80, "protocol": "sctp"}, ["protocol"]),
            ({"container_port": 80, "surprise": 1}, ["surprise"]),
            ({"container_port": "eighty"}, ["container_port"]),
        ):
            status, answer = await _post(h, "a", body)
            assert status == 400, (body, answer)
            assert answer["details"][0]["loc"] == loc
        assert fwd.map == {}


async def test_stop_releases_forwards(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, fwd):
        svc.add(h.user_id(), "a")
        for port in (80, 81):
            assert (await _post(h, "a", {"container_port": port}))[0] == 201
        resp = await h.client.post("/api/containers/a/stop", headers=h.headers())
        assert resp.status == 200
        assert fwd.map == {}
        assert h.store.list_port_forwards() == []
        resp = await h.client.get(_pf("a"), headers=h.headers())
        assert (await resp.json())["count"] == 0


async def test_deleting_the_container_drops_its_rows(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, _fwd):
        rec = svc.add(h.user_id(), "a")
        assert (await _post(h, "a", {"container_port": 80}))[0] == 201
        h.store.delete_container(rec.db_id)
        assert h.store.list_port_forwards() == []


async def test_networking_off_is_503(tmp_path: Path) -> None:
    async with pf_harness(tmp_path, networking=False) as (h, svc, _fwd):
        svc.add(h.user_id(), "a")
        status, body = await _post(h, "a", {"container_port": 80})
        assert status == 503 and "networking" in body["error"]


async def test_openapi_documents_the_endpoints(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, _svc, _fwd):
        resp = await h.client.get("/api/openapi.json", headers=h.headers())
        doc = await resp.json()
        base = "/api/containers/{id}/port-forwards"
        assert set(doc["paths"][base]) == {"get", "post"}
        assert set(doc["paths"][base + "/{forward_id}"]) == {"delete"}
        assert "201" in doc["paths"][base]["post"]["responses"]


async def test_reconcile_at_start_up(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, fwd):
        live = svc.add(h.user_id(), "live")
        dead = svc.add(h.user_id(), "dead")
        assert (await _post(h, "live", {"container_port": 80, "host_port": LO}))[0] == 201
        assert (await _post(h, "live", {"container_port": 81, "host_port": LO + 1}))[0] == 201
        assert (await _post(h, "live", {"container_port": 82, "host_port": LO + 2}))[0] == 201
        assert (await _post(h, "dead", {"container_port": 80, "host_port": LO + 3}))[0] == 201
        # While the daemon was down: one element vanished, one was left by a crash
        # between the nft add and the record, and LO + 2's element vanished while a
        # host process took its port.
        del fwd.map[("tcp", LO + 1)]
        fwd.map[("tcp", LO + 9)] = (live.ip_address or "", 9)
        del fwd.map[("tcp", LO + 2)]
        fwd.busy.add(("tcp", LO + 2))
        changed = svc.forwards.reconcile({live.id})
        assert fwd.map == {
            ("tcp", LO): (live.ip_address, 80),
            ("tcp", LO + 1): (live.ip_address, 81),
        }
        assert sorted(f.host_port for f in h.store.list_port_forwards()) == [LO, LO + 1]
        assert f"restored nft {LO + 1}/tcp" in changed
        assert f"removed nft {LO + 9}/tcp" in changed
        assert f"dropped record {LO + 2}/tcp" in changed
        assert f"dropped record {LO + 3}/tcp" in changed
        assert svc.forwards.for_container(dead) == []
        # A second pass has nothing left to do.
        assert svc.forwards.reconcile({live.id}) == []


async def test_failed_record_removes_the_element(tmp_path: Path) -> None:
    async with pf_harness(tmp_path) as (h, svc, fwd):
        rec = svc.add(h.user_id(), "a")
        h.store.delete_container(rec.db_id)  # the row's foreign key now fails
        status, _ = await _post(h, "a", {"container_port": 80})
        assert status == 500
        assert fwd.map == {}


async def test_sdk_and_cli_round_trip(tmp_path: Path) -> None:
    from rexecd.client.cli import _ports_table, build_parser
    from rexecd.client.sdk import ApiError, AsyncClient

    async with pf_harness(tmp_path) as (h, svc, _fwd):
        svc.add(h.user_id(), "web")
        host = str(h.client.make_url("")).rstrip("/")
        async with AsyncClient(host, h.tokens["alice"]) as c:
            fwd = await c.add_port_forward("web", 8080, host_port=LO + 1)
            assert (fwd.host_port, fwd.container_port, fwd.protocol) == (LO + 1, 8080, "tcp")
            udp = await c.add_port_forward("web", 53, protocol="udp")
            listed = await c.list_port_forwards("web")
            assert [f.id for f in listed.port_forwards] == [fwd.id, udp.id]
            assert listed.count == 2
            gone = await c.delete_port_forward("web", fwd.id)
            assert gone.id == fwd.id and gone.message == "port forward deleted"
            try:
                await c.delete_port_forward("web", fwd.id)
            except ApiError as e:
                assert e.status == 404 and e.code == "port_forward_not_found"
            else:
                raise AssertionError("deleting twice succeeded")
        text = _ports_table([udp])
        assert text.splitlines()[0].split() == ["ID", "HOST", "CONTAINER", "PROTOCOL", "CREATED"]
        assert f"127.0.0.1:{udp.host_port}" in text and " udp " in text
    a = build_parser().parse_args(["ports", "add", "web", "8080", "--host-port", "20001"])
    assert (a.container, a.container_port, a.host_port, a.protocol) == ("web", 8080, 20001, "tcp")
    a = build_parser().parse_args(["ports", "rm", "web", "abc", "--json"])
    assert (a.container, a.id, a.json) == ("web", "abc", True)
    assert build_parser().parse_args(["ports", "ls", "web"]).container == "web"
