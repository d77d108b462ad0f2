"""Every error code of the API on a real daemon: 400, 401, 403 (scope and quota), 404
(unknown and another user's container), 409 and 429 with the default rate limits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    Reply,
    cleaning,
    running_daemon,
    unique,
)

MSG_REQUIRED = "Authorization token required"
MSG_INVALID = "Invalid or expired API token"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def container_requests(ref: str) -> list[tuple[str, str, Any]]:
    """(method, path, json body) of every endpoint that takes a container reference."""
    base = f"/api/containers/{ref}"
    return [
        ("GET", base, None),
        ("POST", f"{base}/start", None),
        ("POST", f"{base}/stop", None),
        ("POST", f"{base}/restart", None),
        ("DELETE", base, None),
        ("PATCH", f"{base}/settings", {"memory_mb": 300}),
        ("POST", f"{base}/exec", {"command": "true"}),
        ("GET", f"{base}/stats", None),
        ("GET", f"{base}/files?path=/etc/passwd", None),
        ("GET", f"{base}/files/list?path=/", None),
        ("DELETE", f"{base}/files?path=/etc/passwd", None),
        ("POST", f"{base}/files/mkdir?path=/tmp/x", None),
    ]


# ------------------------------------------------------------------ 401


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_401_missing_and_invalid_token(daemon: Daemon, transport: str) -> None:
    async with ApiClient(daemon, None, transport) as c:
        paths = [
            ("GET", "/api/containers"),
            ("POST", "/api/containers"),
            ("GET", "/api/containers/x"),
            ("POST", "/api/containers/x/exec"),
            ("GET", "/api/images"),
            ("GET", "/api/roles"),
            ("GET", "/api/tokens"),
            ("GET", "/api/tokens/validate"),
            ("GET", "/api/version"),
            ("GET", "/api/openapi.json"),
        ]
        for method, path in paths:
            r = (await c.request(method, path, anonymous=True)).expect(401)
            assert r["error"] == MSG_REQUIRED, (path, r.body)
            r = (
                await c.request(
                    method, path, headers={"Authorization": "Bearer rexec_" + "ab" * 24}
                )
            ).expect(401)
            assert r["error"] == MSG_INVALID, (path, r.body)
        r = (await c.get("/api/containers", headers={"Authorization": "Bearer nonsense"})).expect(
            401
        )
        assert r["error"] == MSG_INVALID
        r = (await c.get("/api/containers", headers={"Authorization": "Bearer "})).expect(401)
        assert r["error"] in (MSG_REQUIRED, MSG_INVALID)
        # A token in the query string is not accepted for plain requests.
        tok = daemon.token(unique("q"))
        r = (await c.get(f"/api/containers?token={tok}", anonymous=True)).expect(401)
        assert r["error"] == MSG_REQUIRED
        # /health needs nothing.
        (await c.get("/health", anonymous=True)).expect(200)


# ------------------------------------------------------------------ 403


async def test_403_read_scope_cannot_change_anything(daemon: Daemon) -> None:
    user = unique("ro")
    writer, reader = daemon.token(user), daemon.token(user, scopes="read")
    name = unique("ro")
    async with ApiClient(daemon, reader) as c, cleaning(c) as refs:
        r = (await c.create(name)).expect(403)
        assert r["error"]
        r = (await c.post("/api/containers/stream", {"image": "busybox"})).expect(403)
        (await c.post("/api/tokens", {"name": "more"})).expect(403)
        (await c.get("/api/containers")).expect(200)

        refs.append(name)
        await c.create_running(name, token=writer)
        for method, path, body in container_requests(name):
            r = await c.request(method, path, body)
            if method == "GET":
                assert r.status == 200, (path, r.status, r.raw[:200])
            else:
                assert r.status == 403, (path, r.status, r.raw[:200])
        assert (await c.container(name))["status"] == "running"


async def test_403_container_limit_reached(daemon: Daemon) -> None:
    tok = daemon.token(unique("guest"), tier="guest")
    first, second = unique("g1"), unique("g2")
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        refs.extend([first, second])
        await c.create_running(first)
        r = (await c.create(second)).expect(403)
        assert r.body["error"] == "container limit reached"
        assert (r["current"], r["limit"], r["tier"]) == (1, 1, "guest")
        status, _, frames = await c.stream_create({"image": "busybox", "name": second})
        assert status == 403 and frames[0]["error"] == "container limit reached"
        listing = (await c.get("/api/containers")).expect(200).body
        assert listing["count"] == 1 and listing["limit"] == 1
        # A stopped container still counts; a deleted one does not.
        (await c.post(f"/api/containers/{first}/stop")).expect(200)
        (await c.create(second)).expect(403)
        (await c.delete(f"/api/containers/{first}")).expect(200)
        await c.create_running(second)


async def test_quota_is_per_user(daemon: Daemon) -> None:
    a = daemon.token(unique("qa"), tier="guest")
    b = daemon.token(unique("qb"), tier="guest")
    async with (
        ApiClient(daemon, a) as ca,
        ApiClient(daemon, b) as cb,
        cleaning(ca) as ra,
        cleaning(cb) as rb,
    ):
        ra.append("one")
        rb.append("one")
        (await ca.create("one")).expect(202)
        (await cb.create("one")).expect(202)  # same name, other user: fine too
        await ca.wait_status("one", "running")
        await cb.wait_status("one", "running")


# ------------------------------------------------------------------ 404


async def test_404_unknown_container_everywhere(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("nf"))) as c:
        for ref in ("no-such-name", "0" * 64, "00000000-0000-0000-0000-000000000000"):
            for method, path, body in container_requests(ref):
                r = await c.request(method, path, body)
                assert r.status == 404, (method, path, r.status, r.raw[:200])
                assert r["error"]


async def test_404_for_another_users_container(daemon: Daemon) -> None:
    owner, intruder = daemon.token(unique("own")), daemon.token(unique("intr"))
    name = unique("priv")
    async with ApiClient(daemon, owner) as c, ApiClient(daemon, intruder) as x, cleaning(c) as refs:
        refs.append(name)
        c0 = await c.create_running(name)
        await c.sh(name, "echo mine > /home/user/secret")
        for ref in (c0["id"], c0["db_id"], name):
            for method, path, body in container_requests(ref):
                r = await x.request(method, path, body)
                assert r.status == 404, (method, path, r.status, r.raw[:200])
                assert "mine" not in r.raw.decode(errors="replace")
        assert (await x.get("/api/containers")).expect(200)["count"] == 0
        # Untouched: still running, same settings, data intact.
        after = await c.container(name)
        assert after["status"] == "running" and after["resources"] == c0["resources"]
        assert await c.sh(name, "cat /home/user/secret") == "mine\n"


# ------------------------------------------------------------------ 409


async def test_409_name_taken_and_invalid_states(daemon: Daemon) -> None:
    name = unique("dup")
    async with ApiClient(daemon, daemon.token(unique("dup"))) as c, cleaning(c) as refs:
        refs.append(name)
        (await c.create(name)).expect(202)
        r = (await c.create(name)).expect(409)
        assert r["error"] == "container with this name already exists" and r["name"] == name
        status, _, frames = await c.stream_create({"image": "busybox", "name": name})
        assert status == 409 and frames[0]["error"] == "container with this name already exists"
        await c.wait_status(name, "running")
        (await c.post(f"/api/containers/{name}/start")).expect(409)
        (await c.post(f"/api/containers/{name}/stop")).expect(200)
        (await c.post(f"/api/containers/{name}/stop")).expect(409)
        (await c.exec(name, "true")).expect(409)
        (await c.get(f"/api/containers/{name}/files/list")).expect(409)


# ------------------------------------------------------------------ 400


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "x"},
        {"image": ""},
        {"image": "busybox", "name": "-starts-with-dash"},
        {"image": "busybox", "name": "_underscore"},
        {"image": "busybox", "name": "a" * 65},
        {"image": "busybox", "name": "has space"},
        {"image": "busybox", "memory_mb": -1},
        {"image": "busybox", "environment": {"1BAD": "x"}},
        {"image": "busybox", "unexpected": True},
        {"image": ["busybox"]},
    ],
)
async def test_400_invalid_create_body_has_details(daemon: Daemon, body: dict[str, Any]) -> None:
    async with ApiClient(daemon, daemon.token(unique("bad"))) as c:
        r = (await c.post("/api/containers", body)).expect(400)
        assert r["error"] and r.body.get("details"), r.body
        assert (await c.get("/api/containers")).expect(200)["count"] == 0


async def test_400_malformed_json_unknown_image_and_settings(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("bad2"))) as c, cleaning(c) as refs:
        r = (
            await c.post(
                "/api/containers",
                data=b"{not json",
                headers={"Content-Type": "application/json"},
            )
        ).expect(400)
        assert r["error"]
        r = (await c.create(unique(), image="no-such-image")).expect(400)
        assert r["error"] == "unsupported image type"
        assert "busybox" in r["supported_images"]
        r = (await c.create(unique(), image="custom")).expect(400)
        assert r["error"]
        name = unique("set")
        refs.append(name)
        await c.create_running(name)
        for patch in ({"memory_mb": -5}, {"name": "-x"}, {"bogus": 1}):
            r = (await c.patch(f"/api/containers/{name}/settings", patch)).expect(400)
            assert r.body.get("details"), r.body
        r = (await c.post(f"/api/containers/{name}/stop?timeout=-1")).expect(400)
        r = (await c.delete(f"/api/containers/{name}?volumes=maybe")).expect(400)
        assert (await c.container(name))["status"] == "running"
        assert (await c.get("/api/containers")).expect(200)["count"] == 1


# ------------------------------------------------------------------ 429


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with the default rate limits of API.md."""
    limits = {"create_per_min": 10, "ops_per_min": 60, "read_per_min": 120}
    with running_daemon(tmp_path_factory, overrides={"rate_limits": limits}) as d:
        yield d


def check_rate_headers(r: Reply, limit: int) -> int:
    assert r.headers["X-RateLimit-Limit"] == str(limit), r.headers
    remaining = int(r.headers["X-RateLimit-Remaining"])
    assert 0 <= remaining <= limit
    return remaining


def check_429(r: Reply) -> int:
    r.expect(429)
    assert set(r.body) >= {"error", "retry_after"}
    assert r["error"] == "rate limit exceeded"
    retry = r["retry_after"]
    assert isinstance(retry, int | float) and 0 < retry <= 60
    assert r.headers["Retry-After"].isdigit()
    assert int(r.headers["Retry-After"]) == pytest.approx(retry, abs=1)
    assert r.headers["X-RateLimit-Remaining"] == "0"
    return int(r.headers["Retry-After"])


async def test_429_create_limit_with_default_rates(limited: Daemon) -> None:
    tok = limited.token(unique("rl"), tier="enterprise")
    async with ApiClient(limited, tok) as c, cleaning(c) as refs:
        remaining = []
        for i in range(10):
            name = unique(f"r{i}")
            refs.append(name)
            r = (await c.create(name)).expect(202)
            remaining.append(check_rate_headers(r, 10))
        assert remaining == list(range(9, -1, -1))
        r = await c.create(unique("r11"))
        check_429(r)
        assert r.headers["X-RateLimit-Limit"] == "10"
        # The stream endpoint and exec share the creation budget (checked before anything
        # else, so the container need not be running yet).
        check_429(Reply(*(await _stream_raw(c))))
        check_429(await c.exec(refs[0], "true"))
        # Reads and operations have their own budgets, with their own limits; errors
        # carry the headers too. (No status polling here: reads are limited to 120.)
        r = (await c.get("/api/containers")).expect(200)
        assert check_rate_headers(r, 120) == 119
        r = (await c.post("/api/containers/nope/stop")).expect(404)
        assert check_rate_headers(r, 60) == 59
        r = (await c.get("/api/containers/nope")).expect(404)
        assert check_rate_headers(r, 120) == 118
        # Another user is not limited by this one's requests.
        async with ApiClient(limited, limited.token(unique("rl2"))) as other:
            other_name = unique("o")
            r = (await other.create(other_name)).expect(202)
            assert check_rate_headers(r, 10) == 9
            await other.remove(other_name)


async def test_429_read_and_ops_limits(limited: Daemon) -> None:
    tok = limited.token(unique("rr"))
    async with ApiClient(limited, tok) as c:
        replies = await asyncio.gather(*(c.get("/api/containers") for _ in range(120)))
        assert all(r.status == 200 for r in replies)
        assert sorted(check_rate_headers(r, 120) for r in replies) == list(range(120))
        check_429(await c.get("/api/containers"))
        check_429(await c.get("/api/images"))
        # Operations (404s included: the limit counts requests) stop at 60.
        for _ in range(60):
            r = (await c.post("/api/containers/nope/stop")).expect(404)
            check_rate_headers(r, 60)
        check_429(await c.post("/api/containers/nope/stop"))
        check_429(await c.delete("/api/containers/nope"))
        # /health is not limited.
        for _ in range(5):
            (await c.get("/health", anonymous=True)).expect(200)


async def test_admin_is_not_rate_limited_and_a_tenant_still_is(limited: Daemon) -> None:
    """With the default limits (10 creations and execs a minute), an admin token runs 15
    execs in a row without a 429 and without X-RateLimit headers; a tenant's 11th is
    refused, whatever the admin did."""
    admin = limited.token(unique("adm"), tier="enterprise", scopes="read,write,admin")
    async with ApiClient(limited, admin) as c, cleaning(c) as refs:
        name = unique("ex")
        refs.append(name)
        await c.create_running(name)
        for i in range(15):
            r = (await c.exec(name, f"echo {i}")).expect(200)
            assert r["stdout"] == f"{i}\n"
            assert "X-RateLimit-Limit" not in r.headers, r.headers
    async with ApiClient(limited, limited.token(unique("ten"))) as t:
        for _ in range(10):
            r = (await t.exec("nope", "true")).expect(404)
            check_rate_headers(r, 10)
        check_429(await t.exec("nope", "true"))


async def _stream_raw(c: ApiClient) -> tuple[int, dict[str, str], bytes]:
    assert c.session is not None
    async with c.session.post(
        c.base + "/api/containers/stream", json={"image": "busybox"}, headers=c.auth()
    ) as r:
        return r.status, dict(r.headers), await r.read()
