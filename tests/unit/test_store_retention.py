"""The store's bounds: the event log's row cap and age, dead token rows, and the volume
records behind kept volumes (last use, the removal claim that keeps a name free)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rexecd.errors import Conflict, NotFound
from rexecd.models import ContainerRecord, ContainerResources
from rexecd.service.store import EVENT_PRUNE_EVERY, Store, TokenRecord

RES = ContainerResources(memory_mb=512, cpu_shares=1000, disk_mb=2048, network_mbps=10)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LIVE_TOKENS = 100  # the documented cap on tokens a user mints through the API


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def container(user_id: str, name: str) -> ContainerRecord:
    return ContainerRecord(user_id=user_id, name=name, image="ubuntu", resources=RES)


def test_the_event_log_stays_bounded_on_insert(store: Store) -> None:
    keep = 100
    for i in range(10 * keep):
        store.append_event("created", {"i": i}, user_id="u", keep=keep)
        # Never more than the cap plus one trimming interval, at any moment.
        assert store.count_events() <= keep + EVENT_PRUNE_EVERY
    last = store.last_event_seq()
    assert last == 10 * keep
    assert store.list_events(limit=10_000)[-1].seq == last  # the newest survive


def test_prune_events_by_count_and_age(store: Store) -> None:
    for i in range(10):
        store.append_event("created", {"i": i}, ts=T0 + timedelta(days=i))
    assert store.prune_events(8, before=T0 + timedelta(days=5)) == 5
    assert [e.payload["i"] for e in store.list_events()] == [5, 6, 7, 8, 9]
    assert store.prune_events(2) == 3
    assert [e.payload["i"] for e in store.list_events()] == [8, 9]
    assert store.prune_events(2) == 0


def test_prune_tokens_drops_revoked_and_long_expired(store: Store) -> None:
    user = store.create_user("alice", "free")

    def token(tid: str, expires: datetime | None, revoked: bool = False) -> None:
        store.insert_token(
            TokenRecord(
                id=tid,
                user_id=user.id,
                name=tid,
                token_sha256=tid * 8,
                token_prefix=tid,
                scopes=("read",),
                created_at=T0,
                expires_at=expires,
                revoked=revoked,
            )
        )

    token("live", None)
    token("soon", T0 + timedelta(days=30))
    token("old", T0 - timedelta(days=10))
    token("recent", T0 - timedelta(days=1))
    token("revoked", None, revoked=True)
    assert store.prune_tokens(T0 - timedelta(days=7)) == 2
    left = {t.id for t in store.list_tokens(user.id, include_revoked=True)}
    assert left == {"live", "soon", "recent"}


def test_kept_volumes_are_those_without_a_container_oldest_first(store: Store) -> None:
    u = store.create_user("alice", "free").id
    for name in ("a", "b", "c"):
        store.upsert_volume(u, name, f"/v/{name}", 100)
    store.insert_container_checked(container(u, "b"), 10)
    store.touch_volume(u, "a", T0 + timedelta(days=2), 300)
    store.touch_volume(u, "c", T0 + timedelta(days=1))
    kept = store.kept_volumes(u)
    assert [v.name for v in kept] == ["c", "a"]
    assert kept[1].size_mb == 300 and kept[1].last_used == T0 + timedelta(days=2)
    assert [v.name for v in store.kept_volumes(unused_since=T0 + timedelta(days=2))] == ["c"]
    listed = {v.name: v.container_id for v in store.list_volumes(u)}
    assert listed["a"] is None and listed["b"] is not None


def test_claim_volume_refuses_in_use_and_unknown_and_holds_the_name(store: Store) -> None:
    u = store.create_user("alice", "free").id
    other = store.create_user("bob", "free").id
    store.upsert_volume(u, "home", "/v/home", 100)
    store.upsert_volume(u, "busy", "/v/busy", 100)
    store.insert_container_checked(container(u, "busy"), 10)
    with pytest.raises(NotFound):
        store.claim_volume(u, "nope")
    with pytest.raises(NotFound):
        store.claim_volume(other, "home")  # another user's name is simply not there
    with pytest.raises(Conflict):
        store.claim_volume(u, "busy")
    claimed = store.claim_volume(u, "home")
    assert claimed.name == "home"
    with pytest.raises(Conflict):
        store.claim_volume(u, "home")
    # While it is being removed, no container may take the name, by create or rename.
    with pytest.raises(Conflict, match="being removed"):
        store.insert_container_checked(container(u, "home"), 10)
    busy = store.get_container_by_name(u, "busy")
    assert busy is not None
    with pytest.raises(Conflict, match="being removed"):
        store.update_container(busy.db_id, name="home")
    assert [v.name for v in store.volumes_being_removed()] == ["home"]
    assert [v.name for v in store.kept_volumes(u)] == []
    store.delete_volume(u, "home")
    store.insert_container_checked(container(u, "home"), 10)


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    from tests.unit.fakes.store import database_at

    state = tmp_path / "state"
    db = database_at(state, 2)
    db.execute("INSERT INTO users VALUES ('u', 'alice', 'free', '2024-05-01T12:00:00.000000Z')")
    db.execute("INSERT INTO volumes VALUES ('u', 'a', '/v/a', 100, '2024-05-01T12:00:00.000000Z')")
    db.commit()
    db.close()
    with Store(state) as s:
        (v,) = s.list_volumes("u")
        assert v.last_used_at is None and v.last_used == T0 and not v.removing


def test_a_user_cannot_mint_tokens_without_bound(store: Store) -> None:
    from rexecd.errors import QuotaExceeded
    from rexecd.models import TokenCreate
    from rexecd.service import auth

    _, first = auth.create_token(store, "alice", scopes=["read", "write"])
    user = store.get_user_by_name("alice")
    assert user is not None
    p = auth.Principal(
        user_id=user.id,
        user_name="alice",
        tier="free",
        scopes=frozenset({"read", "write"}),
        token_id=first.id,
    )
    minted = [
        auth.create_token_for(store, p, TokenCreate(name=f"t{i}", expires_in=1), now=T0)[1]
        for i in range(LIVE_TOKENS - 1)
    ]
    with pytest.raises(QuotaExceeded) as exc:
        auth.create_token_for(store, p, TokenCreate(name="one-too-many"), now=T0)
    assert exc.value.extra["limit"] == LIVE_TOKENS
    # Revoked and expired tokens do not count; the admin CLI is not capped.
    store.revoke_token(user.id, minted[0].id)
    auth.create_token_for(store, p, TokenCreate(name="again"), now=T0)
    auth.create_token(store, "alice")
    later = T0 + timedelta(days=2)
    assert auth.create_token_for(store, p, TokenCreate(name="later"), now=later)
