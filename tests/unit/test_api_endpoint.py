"""Route metadata lives on the route: each ``Endpoint`` declares the scope it needs and
the rate class it counts in, the middlewares read them from the matched route, and
the request's token is parsed in ``api.credentials``."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from rexecd.api.app import ENDPOINTS
from rexecd.api.credentials import extract_ws_token
from rexecd.api.endpoint import add_endpoints, matched_endpoint, request_rate, request_scope


async def _resolved(method: str, path: str) -> web.Request:
    app = web.Application()
    add_endpoints(app, ENDPOINTS)
    request = make_mocked_request(method, path, app=app)
    match_info = await app.router.resolve(request)
    match_info.add_app(app)  # what the server does before the middlewares run
    request._match_info = match_info
    return request


@pytest.mark.parametrize(
    ("method", "path", "scope", "rate"),
    [
        ("GET", "/health", None, None),
        ("GET", "/api/health", None, None),
        ("GET", "/api/version", "read", "read"),
        ("GET", "/api/containers", "read", "read"),
        ("GET", "/api/containers/events", "read", "read"),
        ("POST", "/api/containers", "write", "create"),
        ("POST", "/api/containers/stream", "write", "create"),
        ("POST", "/api/containers/x/exec", "write", "exec"),
        ("POST", "/api/containers/x/stop", "write", "ops"),
        ("DELETE", "/api/containers/x", "write", "ops"),
        ("PATCH", "/api/containers/x/settings", "write", "ops"),
        # A download is an operation although it is a GET.
        ("GET", "/api/containers/x/files", "read", "ops"),
        ("GET", "/api/containers/x/files/list", "read", "ops"),
        ("POST", "/api/images/import", "admin", "ops"),
        # A terminal is a shell in the container: write, although a GET.
        ("GET", "/ws/terminal/abc", "write", "read"),
        ("POST", "/api/tokens", "write", "ops"),
        ("GET", "/api/tokens/validate", "read", "read"),
        # No route: by method, so an unknown path is answered after authentication.
        ("GET", "/api/nothing-here", "read", "read"),
        ("POST", "/api/nothing-here", "write", "ops"),
        ("PUT", "/api/containers", "write", "ops"),
    ],
)
async def test_scope_and_rate_come_from_the_matched_route(
    method: str, path: str, scope: str | None, rate: str | None
) -> None:
    request = await _resolved(method, path)
    assert (request_scope(request), request_rate(request)) == (scope, rate)


async def test_an_unmatched_request_has_no_endpoint() -> None:
    assert matched_endpoint(await _resolved("GET", "/api/nothing-here")) is None
    ep = matched_endpoint(await _resolved("GET", "/ws/terminal/abc"))
    assert ep is not None and ep.websocket and ep.path == "/ws/terminal/{id}"


def test_every_endpoint_is_declared_once() -> None:
    keys = [(ep.method, ep.path) for ep in ENDPOINTS]
    assert len(keys) == len(set(keys))
    # Public routes are never limited and need no scope, and say so in one place.
    for ep in ENDPOINTS:
        assert (ep.required_scope is None) == (not ep.authenticated) == (ep.rate_class is None)


# --- where a request carries its token -------------------------------------------------


def test_ws_header_wins() -> None:
    creds = extract_ws_token(
        {"authorization": "Bearer H", "Sec-WebSocket-Protocol": "rexec.v1, rexec.token.P"},
        {"token": "Q"},
    )
    assert (creds.token, creds.protocol, creds.source) == ("H", "rexec.v1", "header")


def test_ws_subprotocol() -> None:
    creds = extract_ws_token({"sec-websocket-protocol": "rexec.v1,rexec.token.P"}, {"token": "Q"})
    assert (creds.token, creds.protocol, creds.source) == ("P", "rexec.v1", "protocol")
    only = extract_ws_token({"Sec-WebSocket-Protocol": "rexec.token.P"}, {})
    assert (only.token, only.protocol) == ("P", None)


def test_ws_legacy_query_and_nothing() -> None:
    creds = extract_ws_token({}, {"token": "Q"}, allow_query=True)
    assert (creds.token, creds.protocol, creds.source) == ("Q", None, "query")
    # The legacy fallback is off unless the config switches it on.
    off = extract_ws_token({"Sec-WebSocket-Protocol": "rexec.v1"}, {"token": "Q"})
    assert (off.token, off.protocol, off.source) == (None, "rexec.v1", None)
    empty = extract_ws_token(
        {"Sec-WebSocket-Protocol": "rexec.v1, rexec.token."}, {"token": ""}, allow_query=True
    )
    assert (empty.token, empty.protocol, empty.source) == (None, "rexec.v1", None)


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer T", "T"),
        ("bearer  T ", "T"),
        ("T", "T"),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(value: str | None, token: str | None) -> None:
    from rexecd.api.credentials import bearer_token

    assert bearer_token(value) == token
