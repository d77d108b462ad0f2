"""Tokens: format, hashing-only storage, authentication and scopes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rexecd.api.credentials import bearer_token
from rexecd.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from rexecd.models import TokenCreate
from rexecd.service import auth
from rexecd.service.auth import (
    Principal,
    authenticate,
    create_token,
    create_token_for,
    require,
)
from rexecd.service.store import Store

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path) as s:
        yield s


def test_token_format_and_storage(store: Store, tmp_path: Path) -> None:
    plain, out = create_token(store, "alice", tier="pro", name="cli")
    assert auth.TOKEN_RE.match(plain) and len(plain) == len("rexec_") + 48
    assert out.token_prefix == plain[:12]
    assert out.scopes == ["read", "write"] and out.name == "cli" and out.expires_at is None
    user = store.get_user_by_name("alice")
    assert user is not None and user.tier == "pro"
    rec = store.get_token(out.id)
    assert rec is not None and rec.token_sha256 == hashlib.sha256(plain.encode()).hexdigest()
    # The plaintext is nowhere on disk.
    for f in tmp_path.iterdir():
        assert plain.encode() not in f.read_bytes()


def test_tokens_are_unique(store: Store) -> None:
    assert create_token(store, "a")[0] != create_token(store, "a")[0]


def test_create_token_validates(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="tier"):
        create_token(store, "alice", tier="platinum")
    with pytest.raises(InvalidRequest, match="scopes"):
        create_token(store, "alice", scopes=["read", "sudo"])
    with pytest.raises(InvalidRequest, match="at least one scope"):
        create_token(store, "alice", scopes=[])
    with pytest.raises(InvalidRequest, match="user name"):
        create_token(store, "-alice")
    with pytest.raises(InvalidRequest, match="expires_in"):
        create_token(store, "alice", expires_in_days=0)


def test_create_token_keeps_or_sets_tier(store: Store) -> None:
    create_token(store, "alice", tier="guest")
    create_token(store, "alice")
    assert store.get_user_by_name("alice").tier == "guest"  # type: ignore[union-attr]
    create_token(store, "alice", tier="enterprise")
    assert store.get_user_by_name("alice").tier == "enterprise"  # type: ignore[union-attr]


def test_authenticate(store: Store) -> None:
    plain, out = create_token(store, "alice", tier="free", scopes=["read"])
    for header in (f"Bearer {plain}", f"bearer  {plain} ", plain):
        p = authenticate(store, bearer_token(header), now=T0)
        assert p.user_name == "alice" and p.tier == "free"
        assert p.scopes == frozenset({"read"}) and p.token_id == out.id


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   "])
def test_missing_token(store: Store, header: str | None) -> None:
    with pytest.raises(Unauthorized) as info:
        authenticate(store, bearer_token(header))
    assert info.value.message == "Authorization token required"
    assert info.value.status == 401


@pytest.mark.parametrize(
    "token",
    ["rexec_" + "0" * 48, "rexec_short", "garbage", "Basic dXNlcjpwYXNz", "rexec_" + "G" * 48],
)
def test_invalid_token(store: Store, token: str) -> None:
    with pytest.raises(Unauthorized) as info:
        authenticate(store, token)
    assert info.value.message == "Invalid or expired API token"


def test_expired_and_revoked(store: Store) -> None:
    plain, out = create_token(store, "alice", expires_in_days=1, now=T0)
    assert out.expires_at == T0 + timedelta(days=1)
    authenticate(store, plain, now=T0 + timedelta(hours=23))
    with pytest.raises(Unauthorized, match="Invalid or expired"):
        authenticate(store, plain, now=T0 + timedelta(days=1))
    plain2, out2 = create_token(store, "alice")
    principal = authenticate(store, plain2)
    auth.revoke_token(store, principal, out2.id)
    with pytest.raises(Unauthorized):
        authenticate(store, plain2)
    with pytest.raises(NotFound):
        auth.revoke_token(store, principal, out2.id)


def test_last_used_is_throttled(store: Store) -> None:
    plain, out = create_token(store, "alice")
    authenticate(store, plain, now=T0)
    assert store.get_token(out.id).last_used_at == T0  # type: ignore[union-attr]
    authenticate(store, plain, now=T0 + timedelta(seconds=10))
    assert store.get_token(out.id).last_used_at == T0  # type: ignore[union-attr]
    authenticate(store, plain, now=T0 + timedelta(seconds=61))
    last = store.get_token(out.id).last_used_at  # type: ignore[union-attr]
    assert last == T0 + timedelta(seconds=61)


def principal(*scopes: str) -> Principal:
    return Principal("u", "alice", "free", frozenset(scopes), "t")


def test_scope_implication_and_require() -> None:
    assert principal("admin").has("write") and principal("admin").has("read")
    assert principal("write").has("read") and not principal("write").has("admin")
    assert not principal("read").has("write")
    require(principal("write"), "write")
    with pytest.raises(Forbidden) as info:
        require(principal("read"), "write")
    assert "'write' scope" in info.value.message and info.value.status == 403
    assert info.value.extra["required_scope"] == "write"


def test_create_token_for_cannot_escalate(store: Store) -> None:
    plain, _ = create_token(store, "alice", scopes=["read", "write"])
    caller = authenticate(store, plain)
    _, out = create_token_for(store, caller, TokenCreate(name="ci", expires_in=7), now=T0)
    assert out.scopes == ["read", "write"] and out.expires_at == T0 + timedelta(days=7)
    _, ro = create_token_for(store, caller, TokenCreate(name="ro", scopes=["read"]))
    assert ro.scopes == ["read"]
    with pytest.raises(Forbidden):
        create_token_for(store, caller, TokenCreate(name="x", scopes=["admin"]))
    assert {t.name for t in auth.list_tokens(store, caller)} == {"default", "ci", "ro"}


def test_token_validation_body(store: Store) -> None:
    plain, out = create_token(store, "alice", tier="pro", scopes=["admin", "read"])
    body = auth.token_validation(authenticate(store, plain)).model_dump(mode="json")
    assert body["valid"] is True and body["tier"] == "pro" and body["token_id"] == out.id
    assert body["scopes"] == ["read", "admin"]
