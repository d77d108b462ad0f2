"""User namespace id ranges without root: the leases in the store, the range
arithmetic, the spec's wire form and the config section."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from rexecd.config import Config
from rexecd.errors import InvalidRequest, RuntimeUnavailable
from rexecd.runtime import userns
from rexecd.runtime.spec import (
    ContainerSpec,
    ExecSpec,
    ProcessSpec,
    RootfsSpec,
    UsernsSpec,
)
from rexecd.service.store import Store
from tests.unit.fakes.store import rec, store

__all__ = ["store"]  # fixture


def test_leases_lowest_free_slot_kept_by_holder_and_released(store: Store) -> None:
    u = store.create_user("alice", "enterprise").id
    recs = [rec(u, f"c{i}") for i in range(5)]
    for r in recs:
        store.insert_container_checked(r, limit=10)
    slots = [store.allocate_userns(r.db_id, 4) for r in recs[:4]]
    assert slots == [0, 1, 2, 3]
    with pytest.raises(RuntimeUnavailable):
        store.allocate_userns(recs[4].db_id, 4)
    assert store.allocate_userns(recs[2].db_id, 4) == 2, "a holder keeps its range"
    assert store.release_userns(recs[1].db_id) is True
    assert store.release_userns(recs[1].db_id) is False
    assert store.allocate_userns(recs[4].db_id, 4) == 1
    # Deleting a container drops its lease with it.
    assert store.delete_container(recs[0].db_id)
    assert store.userns_slot(recs[0].db_id) is None
    assert store.list_userns_leases() == {recs[i].db_id: s for i, s in ((4, 1), (2, 2), (3, 3))}
    assert store.allocate_userns(recs[1].db_id, 4) == 0


def test_leases_survive_reopening_the_store(tmp_path: Path) -> None:
    s = Store(tmp_path)
    u = s.create_user("alice", "free").id
    a = rec(u, "a")
    s.insert_container_checked(a, limit=5)
    slot = s.allocate_userns(a.db_id, 8)
    s.close()
    s = Store(tmp_path)
    try:
        assert s.userns_slot(a.db_id) == slot
        assert s.allocate_userns(a.db_id, 8) == slot
    finally:
        s.close()


def test_leases_are_atomic_across_threads(store: Store) -> None:
    u = store.create_user("alice", "enterprise").id
    recs = [rec(u, f"c{i}") for i in range(12)]
    for r in recs:
        store.insert_container_checked(r, limit=20)
    barrier = threading.Barrier(len(recs))
    got: list[int] = []

    def lease(db_id: str) -> None:
        barrier.wait()
        got.append(store.allocate_userns(db_id, 100))

    threads = [threading.Thread(target=lease, args=(r.db_id,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(len(recs)))


def test_ranges_are_disjoint_and_ids_map_back() -> None:
    ranges = userns.IdRanges(base=1_000_000, size=65536, count=3)
    r0, r2 = ranges.range(0), ranges.range(2)
    assert (r0.base, r2.base) == (1_000_000, 1_000_000 + 2 * 65536)
    with pytest.raises(ValueError):
        ranges.range(3)
    assert userns.host_id(r2, 1000) == r2.base + 1000
    assert userns.host_id(None, 1000) == 1000
    with pytest.raises(InvalidRequest):
        userns.host_id(r2, 65536)
    # A host id of any aligned range, or below the base, is the same id inside.
    assert userns.inner_id(r2, r0.base + 33, 1_000_000) == 33
    assert userns.inner_id(r2, 0, 1_000_000) == 0
    assert userns.inner_id(r2, 1000, 1_000_000) == 1000


def test_specs_carry_the_range_over_the_wire() -> None:
    spec = ContainerSpec(
        id="x",
        hostname="h",
        rootfs=RootfsSpec(lowerdirs=["/l"], upperdir="/u", workdir="/w", target="/t"),
        process=ProcessSpec(args=[], seccomp=[]),
        userns=UsernsSpec(base=1_000_000, size=65536),
    )
    assert ContainerSpec.from_dict(spec.to_dict()) == spec
    assert ContainerSpec.from_dict({**spec.to_dict(), "userns": None}).userns is None
    e = ExecSpec(container_pid=1, process=ProcessSpec(args=["sh"], seccomp=[]), join_userns=True)
    assert ExecSpec.from_dict(e.to_dict()).join_userns is True
    with pytest.raises(ValueError):
        UsernsSpec(base=0, size=65536)  # host root is never a container's


def test_config_section() -> None:
    cfg = Config()
    assert cfg.userns.enabled == "auto"
    assert (cfg.userns.base, cfg.userns.size) == (1_000_000, 65536)
    with pytest.raises(ValidationError):
        Config.model_validate({"userns": {"enabled": "yes"}})
    with pytest.raises(ValidationError):
        Config.model_validate({"userns": {"base": 0}})
    with pytest.raises(ValidationError):
        Config.model_validate({"userns": {"base": 1 << 31, "size": 1 << 20, "count": 4096}})


def test_project_quota_is_safe_with_userns_or_the_default_filter_everywhere() -> None:
    from rexecd.daemon import _project_quota_safe

    cfg = Config()
    assert _project_quota_safe(cfg, userns_on=False)  # every tier: default profile
    tiers = cfg.tiers.model_dump()
    tiers["pro"]["seccomp"] = "unconfined"
    loose = Config.model_validate({"tiers": tiers})
    assert not _project_quota_safe(loose, userns_on=False)
    assert _project_quota_safe(loose, userns_on=True)


def test_userns_off_needs_no_probe() -> None:
    from rexecd.daemon import _userns

    assert _userns(Config.model_validate({"userns": {"enabled": "off"}})) is None
