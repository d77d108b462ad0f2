"""Per-user caps on requests in flight: the limiter, and the 429 the exec and file
routes answer past the cap (against the fake service)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import ClientResponse

from rexecd.api.keys import IN_FLIGHT
from rexecd.config import ConcurrencyConfig, Config
from rexecd.errors import ConcurrencyLimited, RateLimited
from rexecd.service.inflight import InFlightLimiter
from tests.unit.fakes.service import harness


def test_a_user_gets_up_to_the_cap_of_each_kind_and_no_more() -> None:
    lim = InFlightLimiter(ConcurrencyConfig(exec_per_user=2, file_ops_per_user=1))
    with lim.hold("u", "exec"), lim.hold("u", "exec"), lim.hold("u", "files"):
        with pytest.raises(ConcurrencyLimited) as exc, lim.hold("u", "exec"):
            pass
        assert exc.value.status == 429 and exc.value.code == "concurrency_limited"
        assert isinstance(exc.value, RateLimited)
        assert exc.value.extra == {"limit": 2, "retry_after": 1}
        assert "at most 2" in exc.value.message and "exec" in exc.value.message
        with pytest.raises(ConcurrencyLimited, match="file operations"), lim.hold("u", "files"):
            pass
        # Other users are counted apart.
        with lim.hold("v", "exec"), lim.hold("v", "files"):
            assert lim.in_flight("v", "exec") == 1
        assert lim.in_flight("u", "exec") == 2
    assert lim.in_flight("u", "exec") == 0 and lim.in_flight("u", "files") == 0


def test_a_slot_frees_when_its_request_fails_and_idle_users_are_forgotten() -> None:
    lim = InFlightLimiter(ConcurrencyConfig(exec_per_user=1, file_ops_per_user=1))
    with pytest.raises(ZeroDivisionError), lim.hold("u", "exec"):
        raise ZeroDivisionError
    with lim.hold("u", "exec"):
        pass
    assert lim._count == {}


def test_defaults_come_from_default_yaml() -> None:
    cfg = Config()
    assert cfg.concurrency.exec_per_user == 16
    assert cfg.concurrency.file_ops_per_user == 4
    assert InFlightLimiter(cfg.concurrency).limit("files") == 4


async def test_exec_past_the_cap_answers_429_with_retry_after(tmp_path: Path) -> None:
    caps = ConcurrencyConfig(exec_per_user=2, file_ops_per_user=1)
    async with harness(tmp_path, concurrency=caps) as h:
        mine = h.service.add(h.user_id(), "box")
        bobs = h.service.add(h.user_id("bob"), "box")
        gate = h.service.exec_gate = asyncio.Event()

        def run(rec_id: str, who: str = "alice") -> asyncio.Future[ClientResponse]:
            return asyncio.ensure_future(
                h.client.post(
                    f"/api/containers/{rec_id}/exec",
                    json={"command": "sleep 1"},
                    headers=h.headers(who),
                )
            )

        def in_flight() -> int:
            assert h.client.server.app is not None
            return h.client.server.app[IN_FLIGHT].in_flight(h.user_id(), "exec")

        held = [run(mine.id), run(mine.id)]
        deadline = asyncio.get_running_loop().time() + 10
        while in_flight() < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # until both have reached the service
        assert in_flight() == 2
        resp = await h.client.post(
            f"/api/containers/{mine.id}/exec", json={"command": "true"}, headers=h.headers()
        )
        assert resp.status == 429
        body = await resp.json()
        assert body["code"] == "concurrency_limited" and body["limit"] == 2
        assert body["retry_after"] == 1 and resp.headers["Retry-After"] == "1"
        assert "X-RateLimit-Limit" in resp.headers
        # Bob has slots of his own; a file operation is another kind.
        bob = run(bobs.id, "bob")
        resp = await h.client.get(
            f"/api/containers/{mine.id}/files/list?path=/tmp", headers=h.headers()
        )
        assert resp.status == 200
        gate.set()
        for r in [*await asyncio.gather(*held), await bob]:
            assert r.status == 200
        assert in_flight() == 0
