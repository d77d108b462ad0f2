"""API tokens: minting, hashing, authenticating, scope checks, and finding a request's token."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, cast

from rexecd.config import TIER_NAMES
from rexecd.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from rexecd.models import (
    NAME_RE,
    Scope,
    TierName,
    TokenCreate,
    TokenOut,
    TokenValidation,
    utcnow,
)
from rexecd.service.store import Store, TokenRecord

TOKEN_PREFIX = "rexec_"
TOKEN_RE = re.compile(r"^rexec_[0-9a-f]{48}\Z")
TOKEN_PREFIX_LEN = 12
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
DEFAULT_SCOPES: tuple[Scope, ...] = ("read", "write")
# A broader scope includes the narrower ones: a token that may change things may
# also look at them, and an admin may do both.
_IMPLIED: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}
# last_used_at is informational; writing it on every request would turn every
# read into a database write.
TOUCH_INTERVAL = timedelta(seconds=60)
WS_PROTOCOL = "rexec.v1"
WS_TOKEN_PROTOCOL_PREFIX = "rexec.token."

# Live tokens a user may mint for themselves through the API: without a cap, every
# POST /api/tokens would add a row that lives until it expires, or forever. The admin
# CLI is not capped.
MAX_LIVE_TOKENS = 100

MSG_TOKEN_REQUIRED = "Authorization token required"
MSG_TOKEN_INVALID = "Invalid or expired API token"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request, as proven by a token."""

    user_id: str
    user_name: str
    tier: str
    scopes: frozenset[str]
    token_id: str
    expires_at: datetime | None = None

    def has(self, scope: str) -> bool:
        return any(scope in _IMPLIED.get(s, frozenset()) for s in self.scopes)


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_hex(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _normalise_scopes(scopes: Iterable[str]) -> tuple[Scope, ...]:
    wanted = set(scopes)
    unknown = wanted - set(SCOPES)
    if unknown:
        raise InvalidRequest(f"unknown scopes {sorted(unknown)}", supported_scopes=list(SCOPES))
    if not wanted:
        raise InvalidRequest("a token needs at least one scope", supported_scopes=list(SCOPES))
    return tuple(s for s in SCOPES if s in wanted)


def token_out(rec: TokenRecord) -> TokenOut:
    return TokenOut(
        id=rec.id,
        name=rec.name,
        token_prefix=rec.token_prefix,
        scopes=[s for s in SCOPES if s in rec.scopes],
        expires_at=rec.expires_at,
        created_at=rec.created_at,
        last_used_at=rec.last_used_at,
    )


def create_token(
    store: Store,
    user_name: str,
    tier: str | None = None,
    scopes: Iterable[str] = DEFAULT_SCOPES,
    name: str = "default",
    expires_in_days: int | None = None,
    *,
    now: datetime | None = None,
) -> tuple[str, TokenOut]:
    """Mint a token for ``user_name``, creating the user (tier ``free`` unless given).

    A ``tier`` given for an existing user changes the user's tier. Returns the
    plaintext token, which is not stored anywhere and cannot be shown again.
    """
    if not NAME_RE.fullmatch(user_name):
        raise InvalidRequest(
            "user name must be 1-64 of [A-Za-z0-9_-], not starting with '-' or '_'"
        )
    if tier is not None and tier not in TIER_NAMES:
        raise InvalidRequest(f"unknown tier {tier!r}", supported_tiers=list(TIER_NAMES))
    if expires_in_days is not None and expires_in_days < 1:
        raise InvalidRequest("expires_in must be at least one day")
    granted = _normalise_scopes(scopes)
    user = store.ensure_user(user_name, tier)
    return _mint(store, user.id, granted, name, expires_in_days, now or utcnow())


def create_token_for(
    store: Store, principal: Principal, body: TokenCreate, *, now: datetime | None = None
) -> tuple[str, TokenOut]:
    """``POST /api/tokens``: a new token for the caller, never broader than the caller's."""
    if body.scopes is None:
        granted = tuple(s for s in DEFAULT_SCOPES if principal.has(s)) or ("read",)
    else:
        granted = _normalise_scopes(body.scopes)
    beyond = [s for s in granted if not principal.has(s)]
    if beyond:
        raise Forbidden(
            f"a token cannot grant scopes it does not hold: {beyond}",
            scopes=sorted(principal.scopes),
        )
    return _mint(
        store,
        principal.user_id,
        granted,
        body.name,
        body.expires_in,
        now or utcnow(),
        limit=MAX_LIVE_TOKENS,
    )


def _mint(
    store: Store,
    user_id: str,
    scopes: tuple[Scope, ...],
    name: str,
    expires_in_days: int | None,
    now: datetime,
    *,
    limit: int | None = None,
) -> tuple[str, TokenOut]:
    plaintext = generate_token()
    rec = TokenRecord(
        id=str(uuid.uuid4()),
        user_id=user_id,
        name=name,
        token_sha256=hash_token(plaintext),
        token_prefix=plaintext[:TOKEN_PREFIX_LEN],
        scopes=scopes,
        created_at=now,
        expires_at=None if expires_in_days is None else now + timedelta(days=expires_in_days),
    )
    store.insert_token(rec, limit=limit)
    return plaintext, token_out(rec)


def bearer_token(value: str | None) -> str | None:
    """The token in an ``Authorization`` value: ``Bearer <tok>``, or a bare token."""
    if value is None:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


def authenticate(
    store: Store, header_or_token: str | None, *, now: datetime | None = None
) -> Principal:
    """The principal behind an ``Authorization`` header value or a bare token."""
    token = bearer_token(header_or_token)
    if token is None:
        raise Unauthorized(MSG_TOKEN_REQUIRED)
    # Malformed tokens are refused before touching the database.
    if not TOKEN_RE.fullmatch(token):
        raise Unauthorized(MSG_TOKEN_INVALID)
    digest = hash_token(token)
    found = store.get_token_by_hash(digest)
    # The lookup is by hash, so its timing tells nothing about a valid token; the
    # constant-time compare guards against a store that ever matches loosely.
    if found is None or not hmac.compare_digest(found[0].token_sha256, digest):
        raise Unauthorized(MSG_TOKEN_INVALID)
    rec, user = found
    now = now or utcnow()
    if rec.revoked or (rec.expires_at is not None and rec.expires_at <= now):
        raise Unauthorized(MSG_TOKEN_INVALID)
    if rec.last_used_at is None or now - rec.last_used_at >= TOUCH_INTERVAL:
        store.touch_token(rec.id, now)
    return Principal(
        user_id=user.id,
        user_name=user.name,
        tier=user.tier,
        scopes=frozenset(s for s in rec.scopes if s in SCOPES),
        token_id=rec.id,
        expires_at=rec.expires_at,
    )


def require(principal: Principal, scope: str) -> None:
    """Raise Forbidden unless the principal's token carries ``scope`` (or a broader one)."""
    if not principal.has(scope):
        raise Forbidden(
            f"this API token lacks the '{scope}' scope",
            required_scope=scope,
            scopes=sorted(principal.scopes),
        )


# The exec stream is a GET (a WebSocket upgrade) that runs a command.
_EXEC_STREAM_RE = re.compile(r"(/api)?/containers/[^/]+/exec/stream")


def required_scope(method: str, path: str) -> Scope | None:
    """The scope an endpoint needs; None for the unauthenticated ones (``/health``).

    Reads need ``read``, changes ``write``, image import ``admin``. A terminal is
    a shell in the container, so opening one needs ``write`` although it is a GET.
    """
    path = path.rstrip("/") or "/"
    if path in ("/health", "/api/health"):
        return None
    if path.endswith("/images/import"):
        return "admin"
    if path.startswith("/ws/terminal") or _EXEC_STREAM_RE.fullmatch(path):
        return "write"
    if method.upper() in ("GET", "HEAD", "OPTIONS"):
        return "read"
    return "write"


def token_validation(principal: Principal) -> TokenValidation:
    """Body of ``GET /api/tokens/validate``."""
    return TokenValidation(
        valid=True,
        user_id=principal.user_id,
        user_name=principal.user_name,
        tier=cast(TierName, principal.tier),
        scopes=[s for s in SCOPES if s in principal.scopes],
        token_id=principal.token_id,
        expires_at=principal.expires_at,
    )


def list_tokens(store: Store, principal: Principal) -> list[TokenOut]:
    return [token_out(t) for t in store.list_tokens(principal.user_id)]


def revoke_token(store: Store, principal: Principal, token_id: str) -> None:
    """Revoke one of the caller's tokens; another user's token id answers 404."""
    if not store.revoke_token(principal.user_id, token_id):
        raise NotFound("token not found", id=token_id)


# --- where a WebSocket upgrade carries its token ---------------------------------------


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
