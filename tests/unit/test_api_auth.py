"""API authentication, scopes, rate limits, tokens, system endpoints and the OpenAPI document."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError, web

from rexecd.api import WS_PROTOCOLS, principal_from_ws_request
from rexecd.config import RateLimitsConfig
from rexecd.service import auth
from tests.unit.fakes.service import harness


async def test_health_needs_no_token(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.service.add(h.user_id(), "one")
        resp = await h.client.get("/health")
        assert resp.status == 200
        body = await resp.json()
        assert body == {
            "status": "ok",
            "containers_total": 1,
            "containers_running": 1,
            "cgroup": "v2",
            "version": "test",
        }
        assert "X-RateLimit-Limit" not in resp.headers


async def test_missing_and_invalid_tokens(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.get("/api/containers")
        assert resp.status == 401
        assert (await resp.json())["error"] == auth.MSG_TOKEN_REQUIRED
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        for header in ("Bearer rexec_" + "0" * 48, "Bearer nonsense", "Basic abc"):
            resp = await h.client.get("/api/containers", headers={"Authorization": header})
            assert resp.status == 401
            assert (await resp.json())["error"] == auth.MSG_TOKEN_INVALID
        # Unknown paths are not a way around authentication.
        resp = await h.client.get("/api/nothing-here")
        assert resp.status == 401
        # A query token is for WebSocket upgrades only: plain requests leak URLs to logs.
        resp = await h.client.get(f"/api/containers?token={h.tokens['alice']}")
        assert resp.status == 401


async def test_revoked_token_is_refused(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.store.get_token_by_hash(auth.hash_token(h.tokens["bob"]))
        assert rec is not None
        h.store.revoke_token(rec[0].user_id, rec[0].id)
        resp = await h.client.get("/api/containers", headers=h.headers("bob"))
        assert resp.status == 401
        assert (await resp.json())["error"] == auth.MSG_TOKEN_INVALID


async def test_scopes_are_enforced(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        ro = h.headers("alice-ro")
        assert (await h.client.get("/api/containers", headers=ro)).status == 200
        resp = await h.client.post("/api/containers", json={"image": "ubuntu"}, headers=ro)
        assert resp.status == 403
        body = await resp.json()
        assert "write" in body["error"] and body["required_scope"] == "write"
        # Even a 403 tells the client where it stands with its rate limit.
        assert "X-RateLimit-Remaining" in resp.headers
        assert h.service.records == {}
        resp = await h.client.post("/api/images/import", data=b"tar", headers=h.headers())
        assert resp.status == 403
        assert (await resp.json())["required_scope"] == "admin"


async def test_another_users_container_is_not_found(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id("alice"), "mine")
        for ref in (rec.id, rec.db_id, rec.name):
            resp = await h.client.get(f"/api/containers/{ref}", headers=h.headers("bob"))
            assert resp.status == 404
            assert (await resp.json())["error"] == "container not found"
            resp = await h.client.get(f"/api/containers/{ref}", headers=h.headers("alice"))
            assert resp.status == 200
        listing = await (await h.client.get("/api/containers", headers=h.headers("bob"))).json()
        assert listing == {"containers": [], "count": 0, "limit": 5}


async def test_rate_limit(tmp_path: Path) -> None:
    limits = RateLimitsConfig(create_per_min=1, ops_per_min=5, read_per_min=2)
    async with harness(tmp_path, limits=limits, clock=lambda: 1000.0) as h:
        first = await h.client.get("/api/containers", headers=h.headers())
        assert first.status == 200
        assert first.headers["X-RateLimit-Limit"] == "2"
        assert first.headers["X-RateLimit-Remaining"] == "1"
        # An error answer is counted and carries the headers too.
        missing = await h.client.get("/api/containers/nope", headers=h.headers())
        assert missing.status == 404
        assert missing.headers["X-RateLimit-Remaining"] == "0"
        limited = await h.client.get("/api/containers", headers=h.headers())
        assert limited.status == 429
        assert await limited.json() == {
            "error": "rate limit exceeded",
            "code": "rate_limited",
            "retry_after": 60,
        }
        assert limited.headers["Retry-After"] == "60"
        assert limited.headers["X-RateLimit-Limit"] == "2"
        assert limited.headers["X-RateLimit-Remaining"] == "0"
        # Classes and users are counted apart.
        other = await h.client.get("/api/containers", headers=h.headers("bob"))
        assert other.status == 200
        created = await h.client.post(
            "/api/containers", json={"image": "ubuntu"}, headers=h.headers()
        )
        assert created.status == 202
        assert created.headers["X-RateLimit-Limit"] == "1"
        again = await h.client.post(
            "/api/containers", json={"image": "ubuntu"}, headers=h.headers()
        )
        assert again.status == 429
        # /health is never limited.
        assert (await h.client.get("/health")).status == 200


async def test_rate_classes_tiers_and_the_admin_exemption(tmp_path: Path) -> None:
    limits = RateLimitsConfig.model_validate(
        {
            "create_per_min": 1,
            "exec_per_min": 2,
            "ops_per_min": 5,
            "read_per_min": 50,
            "tiers": {"free": {"read_per_min": 3}},
            "scopes": {"admin": {"read_per_min": 4}},
        }
    )
    async with harness(tmp_path, limits=limits, clock=lambda: 1000.0) as h:
        h.service.add(h.user_id(), "box")
        # The route says exec; with exec_per_min set it has a window of its own.
        created = await h.client.post(
            "/api/containers", json={"image": "ubuntu"}, headers=h.headers()
        )
        assert created.status == 202 and created.headers["X-RateLimit-Limit"] == "1"
        for remaining in ("1", "0"):
            r = await h.client.post(
                "/api/containers/box/exec", json={"command": "true"}, headers=h.headers()
            )
            assert r.status == 200 and r.headers["X-RateLimit-Remaining"] == remaining
            assert r.headers["X-RateLimit-Limit"] == "2"
        r = await h.client.post(
            "/api/containers/box/exec", json={"command": "true"}, headers=h.headers()
        )
        assert r.status == 429
        # The user's tier (free) sets its read limit.
        r = await h.client.get("/api/containers", headers=h.headers())
        assert r.headers["X-RateLimit-Limit"] == "3"
        # root holds the admin scope: exempt by default, so no window and no headers,
        # however many requests it makes.
        for _ in range(10):
            r = await h.client.get("/api/containers", headers=h.headers("root"))
            assert r.status == 200 and "X-RateLimit-Limit" not in r.headers
    limits = limits.model_copy(update={"exempt_scopes": []})
    async with harness(tmp_path / "2", limits=limits, clock=lambda: 1000.0) as h:
        # Not exempt: the admin scope's own numbers apply, over the tier's.
        statuses = [
            (await h.client.get("/api/containers", headers=h.headers("root"))).status
            for _ in range(5)
        ]
        assert statuses == [200, 200, 200, 200, 429]


async def test_tokens_endpoints(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.post(
            "/api/tokens",
            json={"name": "ci", "scopes": ["read"], "expires_in": 7},
            headers=h.headers(),
        )
        assert resp.status == 201
        created = await resp.json()
        assert auth.TOKEN_RE.match(created["token"])
        assert created["name"] == "ci" and created["scopes"] == ["read"]
        assert created["token_prefix"] == created["token"][:12]
        assert created["expires_at"].endswith("Z") and created["created_at"].endswith("Z")
        new_headers = {"Authorization": f"Bearer {created['token']}"}

        resp = await h.client.get("/api/tokens/validate", headers=new_headers)
        assert resp.status == 200
        valid = await resp.json()
        assert valid["valid"] is True and valid["user_name"] == "alice"
        assert valid["scopes"] == ["read"] and valid["token_id"] == created["id"]

        listing = await (await h.client.get("/api/tokens", headers=h.headers())).json()
        assert listing["count"] == 3
        assert created["id"] in {t["id"] for t in listing["tokens"]}
        assert created["token"] not in json.dumps(listing)

        # A read token cannot mint itself a write token.
        resp = await h.client.post(
            "/api/tokens", json={"name": "x", "scopes": ["write"]}, headers=h.headers("alice-ro")
        )
        assert resp.status == 403
        # Bob cannot revoke alice's token.
        resp = await h.client.delete(f"/api/tokens/{created['id']}", headers=h.headers("bob"))
        assert resp.status == 404
        resp = await h.client.delete(f"/api/tokens/{created['id']}", headers=h.headers())
        assert resp.status == 200
        assert await resp.json() == {"message": "token revoked", "id": created["id"]}
        assert (await h.client.get("/api/tokens/validate", headers=new_headers)).status == 401

        resp = await h.client.post("/api/tokens", json={"scopes": ["read"]}, headers=h.headers())
        assert resp.status == 400
        body = await resp.json()
        assert body["error"] == "invalid request body"
        assert body["details"][0]["loc"] == ["name"]


async def test_version_and_errors_for_unknown_routes(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.get("/api/version", headers=h.headers())
        assert await resp.json() == {"version": "1.2.3", "build": "abc"}
        resp = await h.client.get("/api/nothing", headers=h.headers())
        assert resp.status == 404
        assert await resp.json() == {"error": "not found", "code": "not_found"}
        resp = await h.client.put("/api/containers", headers=h.headers())
        assert resp.status == 405
        assert await resp.json() == {"error": "method not allowed", "code": "method_not_allowed"}
        assert "GET" in resp.headers["Allow"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_document(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.get("/api/openapi.json", headers=h.headers())
        assert resp.status == 200
        doc = json.loads(await resp.text())
        assert doc["openapi"].startswith("3.1")
        paths = doc["paths"]
        expected = {
            ("/health", "get"),
            ("/api/version", "get"),
            ("/api/openapi.json", "get"),
            ("/api/containers", "get"),
            ("/api/containers", "post"),
            ("/api/containers/stream", "post"),
            ("/api/containers/events", "get"),
            ("/api/containers/{id}", "get"),
            ("/api/containers/{id}", "delete"),
            ("/api/containers/{id}/start", "post"),
            ("/api/containers/{id}/stop", "post"),
            ("/api/containers/{id}/restart", "post"),
            ("/api/containers/{id}/settings", "patch"),
            ("/api/containers/{id}/exec", "post"),
            ("/api/containers/{id}/stats", "get"),
            ("/api/containers/{id}/files", "post"),
            ("/api/containers/{id}/files", "get"),
            ("/api/containers/{id}/files", "delete"),
            ("/api/containers/{id}/files/list", "get"),
            ("/api/containers/{id}/files/mkdir", "post"),
            ("/api/images", "get"),
            ("/api/roles", "get"),
            ("/api/images/import", "post"),
            ("/api/tokens", "post"),
            ("/api/tokens", "get"),
            ("/api/tokens/validate", "get"),
            ("/api/tokens/{token_id}", "delete"),
        }
        have = {(path, method) for path, ops in paths.items() for method in ops}
        assert expected <= have
        schemas = doc["components"]["schemas"]
        for ref in _refs(doc):
            assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas
        create = paths["/api/containers"]["post"]
        assert create["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ContainerCreate"
        }
        assert "202" in create["responses"] and "409" in create["responses"]
        assert "async" in schemas["ContainerOut"]["properties"]
        assert paths["/health"]["get"]["security"] == []
        ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
        assert len(ids) == len(set(ids))


async def test_websocket_token_styles(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        token = h.tokens["alice"]
        # Subprotocol: rexec.v1 is echoed, the token protocol is not.
        async with h.client.ws_connect(
            "/api/containers/events", protocols=("rexec.v1", f"rexec.token.{token}")
        ) as ws:
            assert ws.protocol == "rexec.v1"
            assert (await ws.receive_json())["type"] == "list"
        async with h.client.ws_connect("/api/containers/events", headers=h.headers()) as ws:
            assert (await ws.receive_json())["type"] == "list"
        # ?token= is a legacy fallback: refused until the config switches it on.
        with pytest.raises(WSServerHandshakeError) as refused:
            await h.client.ws_connect(f"/api/containers/events?token={token}")
        assert refused.value.status == 401
        h.cfg.auth.ws_query_token = True
        async with h.client.ws_connect(f"/api/containers/events?token={token}") as ws:
            assert (await ws.receive_json())["type"] == "list"
        try:
            await h.client.ws_connect("/api/containers/events?token=rexec_bad")
        except WSServerHandshakeError as exc:
            assert exc.status == 401
        else:
            raise AssertionError("a bad token must not upgrade")


async def test_a_plain_websocket_route_gets_ws_auth(tmp_path: Path) -> None:
    """A route added without an Endpoint (``extra_routes``) is still authenticated, by
    any of the WebSocket token sources, and needs the scope of its method."""
    seen: list[str] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        p = await principal_from_ws_request(request)
        seen.append(p.user_name)
        ws = web.WebSocketResponse(protocols=WS_PROTOCOLS)
        await ws.prepare(request)
        await ws.send_json({"type": "connected"})
        await ws.close()
        return ws

    def routes(app: web.Application) -> None:
        app.router.add_get("/ws/hook/{id}", hook)

    async with harness(tmp_path, extra_routes=routes) as h:
        token = h.tokens["alice-ro"]
        async with h.client.ws_connect(
            "/ws/hook/abc", protocols=("rexec.v1", f"rexec.token.{token}")
        ) as ws:
            assert ws.protocol == "rexec.v1"
            assert (await ws.receive_json()) == {"type": "connected"}
        assert seen == ["alice"]
        try:
            await h.client.ws_connect("/ws/hook/abc")
        except WSServerHandshakeError as exc:
            assert exc.status == 401
        else:
            raise AssertionError("no token must not upgrade")
        assert seen == ["alice"]


async def test_token_subprotocol_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with harness(tmp_path) as h:
        token = h.tokens["alice"]
        # Without rexec.v1 aiohttp logs the offered protocols; the token must not show.
        with caplog.at_level(logging.DEBUG, logger="aiohttp"):
            async with h.client.ws_connect(
                "/api/containers/events", protocols=(f"rexec.token.{token}",)
            ) as ws:
                assert (await ws.receive_json())["type"] == "list"
        assert "rexec.token.<redacted>" in caplog.text
        assert token not in caplog.text
