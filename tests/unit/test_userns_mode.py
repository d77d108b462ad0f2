"""``userns.mode`` in the store, without root: ranges per container or per user, the
rules the database itself keeps (a range is one user's; a per-container range is one
container's), a change of mode over existing leases, and the migration of a database
written before ranges had rows of their own."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from rexecd.config import Config
from rexecd.errors import NotFound, RuntimeUnavailable
from rexecd.service.store import MIGRATIONS, Store
from tests.unit.fakes.store import database_at, rec, store

__all__ = ["store"]  # fixture


def uid(s: Store, name: str) -> str:
    user = s.get_user_by_name(name)
    assert user is not None
    return user.id


def containers(s: Store, user: str, *names: str) -> list[str]:
    """db ids of new containers ``names`` of a new user ``user``."""
    uid = s.create_user(user, "enterprise").id
    out = []
    for name in names:
        r = rec(uid, name)
        s.insert_container_checked(r, limit=50)
        out.append(r.db_id)
    return out


def test_per_user_one_range_per_user_held_until_the_last_container_goes(store: Store) -> None:
    a1, a2, a3 = containers(store, "alice", "a1", "a2", "a3")
    (b1,) = containers(store, "bob", "b1")
    sa = store.allocate_userns(a1, 8, per_user=True)
    assert store.allocate_userns(a2, 8, per_user=True) == sa
    sb = store.allocate_userns(b1, 8, per_user=True)
    assert sb != sa, "two users never share a range"
    assert store.list_userns_ranges() == {
        sa: (uid(store, "alice"), True),
        sb: (uid(store, "bob"), True),
    }
    # One of alice's two goes (released, or deleted): the range stays with the other.
    assert store.release_userns(a1) is True
    assert sa in store.list_userns_ranges()
    assert store.allocate_userns(a3, 8, per_user=True) == sa
    assert store.delete_container(a2)
    assert sa in store.list_userns_ranges()
    # The last one goes with the cascade of its delete: the range is free again, and the
    # next user to need one gets it.
    assert store.delete_container(a3)
    assert sa not in store.list_userns_ranges()
    (c1,) = containers(store, "carol", "c1")
    assert store.allocate_userns(c1, 8, per_user=True) == sa
    assert store.list_userns_ranges()[sa] == (uid(store, "carol"), True)


def test_per_user_ranges_count_against_userns_count(store: Store) -> None:
    (a1, a2) = containers(store, "alice", "a1", "a2")
    (b1,) = containers(store, "bob", "b1")
    assert store.allocate_userns(a1, 1, per_user=True) == 0
    # alice's second container needs no new range; bob's would.
    assert store.allocate_userns(a2, 1, per_user=True) == 0
    with pytest.raises(RuntimeUnavailable):
        store.allocate_userns(b1, 1, per_user=True)
    assert store.list_userns_leases() == {a1: 0, a2: 0}


def test_per_container_ranges_are_never_shared_even_within_a_user(store: Store) -> None:
    a1, a2 = containers(store, "alice", "a1", "a2")
    assert store.allocate_userns(a1, 8) == 0
    assert store.allocate_userns(a2, 8) == 1
    assert store.list_userns_ranges() == {
        0: (uid(store, "alice"), False),
        1: (uid(store, "alice"), False),
    }


def test_a_change_of_mode_keeps_every_existing_lease(store: Store) -> None:
    a1, a2, a3 = containers(store, "alice", "a1", "a2", "a3")
    own = store.allocate_userns(a1, 8)  # leased under mode: container
    # Now mode: user. a1 keeps its own range; a2 gets alice's shared one, a new one.
    assert store.allocate_userns(a1, 8, per_user=True) == own
    shared = store.allocate_userns(a2, 8, per_user=True)
    assert shared != own
    # ... and never joins a1's per-container range, which stays a1's alone.
    assert store.allocate_userns(a3, 8, per_user=True) == shared
    # Back to mode: container: the shared range's holders keep it.
    assert store.allocate_userns(a2, 8) == shared
    (a4,) = [rec(uid(store, "alice"), "a4")]
    store.insert_container_checked(a4, limit=50)
    assert store.allocate_userns(a4.db_id, 8) not in {own, shared}


def test_the_database_refuses_a_lease_across_users_or_into_a_private_range(
    store: Store,
) -> None:
    (a1, a2) = containers(store, "alice", "a1", "a2")
    (b1,) = containers(store, "bob", "b1")
    shared = store.allocate_userns(a1, 8, per_user=True)
    (b2,) = [rec(uid(store, "bob"), "b2")]
    store.insert_container_checked(b2, limit=50)
    private = store.allocate_userns(b2.db_id, 8)

    def lease(db_id: str, slot: int) -> None:
        with store._write() as db:
            db.execute(
                "INSERT INTO userns_leases (container_db_id, slot, leased_at) VALUES (?, ?, 'x')",
                (db_id, slot),
            )

    with pytest.raises(sqlite3.IntegrityError, match="another owner"):
        lease(b1, shared)  # bob into alice's shared range
    with pytest.raises(sqlite3.IntegrityError, match="another owner"):
        lease(b1, private)  # bob's own other container's range
    with pytest.raises(sqlite3.IntegrityError):
        lease(a2, 7)  # a range nobody leased
    assert store.list_userns_leases() == {a1: shared, b2.db_id: private}


def test_a_deleted_container_gets_no_range(store: Store) -> None:
    (a1,) = containers(store, "alice", "a1")
    assert store.delete_container(a1)
    with pytest.raises(NotFound):
        store.allocate_userns(a1, 8, per_user=True)
    assert store.list_userns_ranges() == {}


def test_per_user_leases_are_atomic_across_threads(store: Store) -> None:
    alice = containers(store, "alice", *(f"a{i}" for i in range(6)))
    bob = containers(store, "bob", *(f"b{i}" for i in range(6)))
    ids = alice + bob
    barrier = threading.Barrier(len(ids))
    got: dict[str, int] = {}

    def lease(db_id: str) -> None:
        barrier.wait()
        got[db_id] = store.allocate_userns(db_id, 100, per_user=True)

    threads = [threading.Thread(target=lease, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({got[i] for i in alice}) == 1 and len({got[i] for i in bob}) == 1
    assert got[alice[0]] != got[bob[0]]
    assert len(store.list_userns_ranges()) == 2


def test_leases_of_a_version_4_database_become_per_container_ranges(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = database_at(state, 4)
    t = "2026-01-01T00:00:00.000000Z"
    db.execute("INSERT INTO users VALUES ('u', 'alice', 'free', ?)", (t,))
    for db_id, slot in (("c0", 0), ("c2", 2)):
        db.execute(
            """INSERT INTO containers (db_id, id, user_id, name, image, status, created_at,
                 resources, environment, labels, network_mode, spec)
               VALUES (?, ?, 'u', ?, 'ubuntu', 'running', ?, '{}', '{}', '{}', 'default', '{}')""",
            (db_id, db_id * 32, db_id, t),
        )
        db.execute("INSERT INTO userns_leases VALUES (?, ?, ?)", (slot, db_id, t))
    db.commit()
    db.close()
    with Store(state) as s:
        assert s.schema_version() == len(MIGRATIONS)
        assert s.list_userns_leases() == {"c0": 0, "c2": 2}
        assert s.list_userns_ranges() == {0: ("u", False), 2: ("u", False)}
        # They keep their ranges under mode: user too; a new container fills the gap.
        assert s.allocate_userns("c2", 8, per_user=True) == 2
        (new,) = [rec("u", "new")]
        s.insert_container_checked(new, limit=10)
        assert s.allocate_userns(new.db_id, 8, per_user=True) == 1
        # The triggers came with the migration: the last lease out frees the range.
        assert s.delete_container("c0")
        assert 0 not in s.list_userns_ranges()


def test_config_mode() -> None:
    assert Config().userns.mode == "container"
    assert Config.model_validate({"userns": {"mode": "user"}}).userns.mode == "user"
    with pytest.raises(ValidationError):
        Config.model_validate({"userns": {"mode": "tenant"}})
