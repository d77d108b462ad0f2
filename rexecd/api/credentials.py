"""Where a request carries its API token: the ``Authorization`` header, and for a
WebSocket upgrade also the ``Sec-WebSocket-Protocol`` header or ``?token=``.

Parsing only: ``service.auth`` is handed the bare token and decides who it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

WS_PROTOCOL = "rexec.v1"
WS_TOKEN_PROTOCOL_PREFIX = "rexec.token."


def bearer_token(value: str | None) -> str | None:
    """The token in an ``Authorization`` value: ``Bearer <tok>``, or a bare token."""
    if value is None:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


@dataclass(frozen=True, slots=True)
class WsCredentials:
    """The token of an upgrade request and the subprotocol to answer with."""

    token: str | None
    # Browsers drop a connection whose offered subprotocols get no answer, so
    # ``rexec.v1`` is echoed whenever it was offered, whatever carried the token.
    protocol: str | None
    source: Literal["header", "protocol", "query"] | None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def extract_ws_token(
    headers: Mapping[str, str], query: Mapping[str, str], *, allow_query: bool = False
) -> WsCredentials:
    """Find the token: ``Authorization: Bearer``, then ``Sec-WebSocket-Protocol:
    rexec.v1, rexec.token.<tok>``, then the legacy ``?token=`` (only with
    ``allow_query``: the config switches it on), in that order."""
    offered = [
        p.strip()
        for p in (_header(headers, "Sec-WebSocket-Protocol") or "").split(",")
        if p.strip()
    ]
    protocol = WS_PROTOCOL if WS_PROTOCOL in offered else None
    token = bearer_token(_header(headers, "Authorization"))
    if token is not None:
        return WsCredentials(token, protocol, "header")
    for p in offered:
        if p.startswith(WS_TOKEN_PROTOCOL_PREFIX) and len(p) > len(WS_TOKEN_PROTOCOL_PREFIX):
            return WsCredentials(p[len(WS_TOKEN_PROTOCOL_PREFIX) :], protocol, "protocol")
    legacy = (query.get("token") or "").strip() if allow_query else ""
    if legacy:
        return WsCredentials(legacy, protocol, "query")
    return WsCredentials(None, protocol, None)
