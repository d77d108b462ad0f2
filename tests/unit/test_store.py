"""The SQLite store: schema, permissions, race-free quota checks, leases, events, volumes."""

from __future__ import annotations

import sqlite3
import stat
import threading
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from rexecd.errors import Conflict, NotFound, QuotaExceeded, RexecError, RuntimeUnavailable
from rexecd.models import ContainerRecord
from rexecd.service.store import MIGRATIONS, Store, TokenRecord
from tests.unit.fakes.store import RES, rec, store

__all__ = ["store"]  # a fixture used here

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_files_and_pragmas(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Store(state) as s:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        s.create_user("alice", "free")
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert s.schema_version() == len(MIGRATIONS)
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_existing_state_dir_mode_is_left_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with Store(tmp_path):
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600


def test_reopen_keeps_data_and_does_not_remigrate(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.create_user("alice", "free")
    with Store(tmp_path) as s:
        assert s.get_user_by_name("alice") is not None
        assert s.schema_version() == len(MIGRATIONS)


def test_refuses_newer_schema(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RexecError, match="newer"):
        Store(tmp_path)


# --- users and tokens ------------------------------------------------------------------


def test_users(store: Store) -> None:
    alice = store.create_user("alice", "free")
    assert store.get_user(alice.id) == alice
    with pytest.raises(Conflict):
        store.create_user("alice", "pro")
    assert store.ensure_user("alice", None) == alice
    upgraded = store.ensure_user("alice", "pro")
    assert upgraded.id == alice.id and upgraded.tier == "pro"
    bob = store.ensure_user("bob", None)
    assert bob.tier == "free"
    store.set_user_tier(bob.id, "guest")
    assert store.get_user(bob.id).tier == "guest"  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        store.set_user_tier("nope", "pro")
    assert [u.name for u in store.list_users()] == ["alice", "bob"]


def test_tokens(store: Store) -> None:
    user = store.create_user("alice", "free")
    tok = TokenRecord(
        id="t1", user_id=user.id, name="cli", token_sha256="a" * 64,
        token_prefix="rexec_123456", scopes=("read", "write"), created_at=T0,
    )  # fmt: skip
    store.insert_token(tok)
    found = store.get_token_by_hash("a" * 64)
    assert found is not None
    assert found[0] == tok and found[1] == user
    assert store.get_token_by_hash("b" * 64) is None
    store.touch_token("t1", T0 + timedelta(minutes=1))
    assert store.get_token("t1").last_used_at == T0 + timedelta(minutes=1)  # type: ignore[union-attr]
    assert [t.id for t in store.list_tokens(user.id)] == ["t1"]
    assert store.revoke_token("someone-else", "t1") is False
    assert store.revoke_token(user.id, "t1") is True
    assert store.revoke_token(user.id, "t1") is False
    assert store.list_tokens(user.id) == []
    assert len(store.list_tokens(user.id, include_revoked=True)) == 1
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_token(TokenRecord(
            id="t2", user_id=user.id, name="dup", token_sha256="a" * 64,
            token_prefix="x", scopes=("read",), created_at=T0,
        ))  # fmt: skip


# --- containers ------------------------------------------------------------------------


def test_insert_get_find_list(store: Store) -> None:
    u = store.create_user("alice", "free").id
    other = store.create_user("bob", "free").id
    a = rec(u, "a", created_at=T0)
    b = rec(u, "b", created_at=T0 + timedelta(seconds=1), environment={"K": "v"})
    store.insert_container_checked(a, limit=5)
    store.insert_container_checked(b, limit=5)
    assert store.get_container(a.db_id) == a
    assert store.get_container_by_id(b.id) == b
    assert store.get_container_by_name(u, "b") == b
    for ref in (a.id, a.db_id, "a"):
        assert store.find_container(u, ref) == a
    assert store.find_container(other, a.id) is None, "another user's container is invisible"
    assert store.find_container(u, "zzz") is None
    assert [c.name for c in store.list_containers(u)] == ["b", "a"]
    assert store.list_containers(other) == []
    assert len(store.list_containers()) == 2
    assert store.count_containers(u) == 2
    assert store.container_counts() == {"creating": 2}


def test_same_name_other_user_is_fine(store: Store) -> None:
    u1 = store.create_user("alice", "free").id
    u2 = store.create_user("bob", "free").id
    store.insert_container_checked(rec(u1, "box"), limit=1)
    store.insert_container_checked(rec(u2, "box"), limit=1)


def test_name_conflict_and_quota(store: Store) -> None:
    u = store.create_user("alice", "guest").id
    store.insert_container_checked(rec(u, "box"), limit=1)
    # The name is checked before the count: same name gives 409 even at the limit.
    with pytest.raises(Conflict) as conflict:
        store.insert_container_checked(rec(u, "box"), limit=1)
    assert conflict.value.message == "container with this name already exists"
    assert conflict.value.extra == {"name": "box"}
    with pytest.raises(QuotaExceeded) as quota:
        store.insert_container_checked(rec(u, "other"), limit=1)
    assert quota.value.message == "container limit reached"
    assert quota.value.extra == {"current": 1, "limit": 1, "tier": "guest"}
    assert quota.value.status == 403


def test_quota_is_race_free_across_threads(store: Store) -> None:
    u = store.create_user("alice", "free").id
    barrier = threading.Barrier(20)
    results: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.insert_container_checked(rec(u, f"c{i}"), limit=5)
            outcome = "ok"
        except QuotaExceeded:
            outcome = "quota"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("quota") == 15
    assert store.count_containers(u) == 5


def test_same_name_race_gives_one_winner(store: Store) -> None:
    u = store.create_user("alice", "free").id
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def create() -> None:
        barrier.wait()
        try:
            store.insert_container_checked(rec(u, "same"), limit=100)
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=create) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 9 + ["ok"]


def test_race_across_two_store_instances(tmp_path: Path) -> None:
    # Two connections to one file stand in for two processes (daemon and CLI).
    s1, s2 = Store(tmp_path), Store(tmp_path)
    try:
        u = s1.create_user("alice", "free").id
        barrier = threading.Barrier(10)
        ok: list[int] = []

        def create(s: Store, i: int) -> None:
            barrier.wait()
            try:
                s.insert_container_checked(rec(u, f"c{i}"), limit=3)
                ok.append(i)
            except QuotaExceeded:
                pass

        threads = [
            threading.Thread(target=create, args=(s1 if i % 2 else s2, i)) for i in range(10)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ok) == 3 and s1.count_containers(u) == 3
    finally:
        s1.close()
        s2.close()


def test_update_container(store: Store) -> None:
    u = store.create_user("alice", "free").id
    a, b = rec(u, "a"), rec(u, "b")
    store.insert_container_checked(a, limit=5)
    store.insert_container_checked(b, limit=5)
    new_res = RES.model_copy(update={"memory_mb": 1024})
    got = store.update_container(
        a.db_id, status="running", pid=42, pid_start_time=123456, started_at=T0,
        ip_address="10.88.0.2", resources=new_res, spec={"rootfs": "/x"},
    )  # fmt: skip
    assert got.status == "running" and got.resources.memory_mb == 1024
    assert store.get_container(a.db_id) == got
    with pytest.raises(Conflict):
        store.update_container(a.db_id, name="b")
    with pytest.raises(ValueError):
        store.update_container(a.db_id, status="exploded")
    with pytest.raises(ValueError):
        store.update_container(a.db_id, user_id="someone")
    with pytest.raises(NotFound):
        store.update_container("missing", status="stopped")
    assert store.get_container(a.db_id) == got, "failed updates change nothing"
    renamed = store.update_container(a.db_id, name="c")
    assert store.get_container_by_name(u, "c") == renamed


def test_delete_container_releases_leases(store: Store) -> None:
    u = store.create_user("alice", "free").id
    a = rec(u, "a")
    store.insert_container_checked(a, limit=5)
    store.allocate_ip(a.db_id, IPv4Network("10.88.0.0/16"))
    assert store.delete_container(a.db_id) is True
    assert store.delete_container(a.db_id) is False
    assert store.list_leases() == []
    assert store.get_container(a.db_id) is None


# --- IP leases -------------------------------------------------------------------------


def test_ip_leases_lowest_free(store: Store) -> None:
    u = store.create_user("alice", "enterprise").id
    net = IPv4Network("10.88.0.0/29")  # hosts .1-.6; .1 is the gateway
    recs = [rec(u, f"c{i}") for i in range(6)]
    for r in recs:
        store.insert_container_checked(r, limit=10)
    ips = [store.allocate_ip(r.db_id, net) for r in recs[:5]]
    assert ips == [IPv4Address(f"10.88.0.{i}") for i in range(2, 7)]
    with pytest.raises(RuntimeUnavailable):
        store.allocate_ip(recs[5].db_id, net)
    assert store.allocate_ip(recs[0].db_id, net) == ips[0], "a holder keeps its address"
    assert store.release_ips(recs[1].db_id) == 1
    assert store.allocate_ip(recs[5].db_id, net) == IPv4Address("10.88.0.3")
    assert store.release_ip("10.88.0.4") is True
    assert [str(lease.ip) for lease in store.list_leases()] == [
        "10.88.0.2", "10.88.0.3", "10.88.0.5", "10.88.0.6",
    ]  # fmt: skip


def test_ip_leases_ignore_other_subnets(store: Store) -> None:
    u = store.create_user("alice", "free").id
    a, b = rec(u, "a"), rec(u, "b")
    store.insert_container_checked(a, limit=5)
    store.insert_container_checked(b, limit=5)
    assert store.allocate_ip(a.db_id, IPv4Network("10.1.0.0/24")) == IPv4Address("10.1.0.2")
    assert store.allocate_ip(b.db_id, IPv4Network("10.2.0.0/24")) == IPv4Address("10.2.0.2")


def test_ip_leases_are_atomic_across_threads(store: Store) -> None:
    u = store.create_user("alice", "enterprise").id
    recs = [rec(u, f"c{i}") for i in range(16)]
    for r in recs:
        store.insert_container_checked(r, limit=20)
    barrier = threading.Barrier(16)
    got: list[IPv4Address] = []

    def lease(r: ContainerRecord) -> None:
        barrier.wait()
        got.append(store.allocate_ip(r.db_id, IPv4Network("10.88.0.0/16")))

    threads = [threading.Thread(target=lease, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [IPv4Address(int(IPv4Address("10.88.0.2")) + i) for i in range(16)]


def test_lease_needs_a_container(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.allocate_ip("no-such-container", IPv4Network("10.88.0.0/16"))


# --- volumes and events ----------------------------------------------------------------


def test_volumes(store: Store) -> None:
    u = store.create_user("alice", "free").id
    v = store.upsert_volume(u, "box", "/var/lib/rexecd/volumes/x.img", 2048)
    again = store.upsert_volume(u, "box", "/elsewhere.img", 4096)
    assert again.created_at == v.created_at and again.size_mb == 4096
    assert store.get_volume(u, "box") == again
    assert store.list_volumes(u) == [again] == store.list_volumes()
    assert store.delete_volume(u, "box") is True
    assert store.delete_volume(u, "box") is False
    assert store.get_volume(u, "box") is None


def test_events(store: Store) -> None:
    s1 = store.append_event("created", {"name": "a"}, user_id="u1", container_db_id="c1", ts=T0)
    s2 = store.append_event("started", {"name": "a"}, user_id="u1", container_db_id="c1")
    s3 = store.append_event("created", {"name": "b"}, user_id="u2")
    assert s1 < s2 < s3 == store.last_event_seq()
    assert [e.seq for e in store.list_events()] == [s1, s2, s3]
    assert [e.seq for e in store.list_events(s1)] == [s2, s3]
    assert [e.seq for e in store.list_events(0, user_id="u1")] == [s1, s2]
    assert [e.seq for e in store.list_events(0, limit=1)] == [s1]
    first = store.list_events()[0]
    assert first.ts == T0 and first.payload == {"name": "a"} and first.type == "created"
    assert store.prune_events(keep=1) == 2
    assert [e.seq for e in store.list_events()] == [s3]
