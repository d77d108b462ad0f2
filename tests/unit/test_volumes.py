"""Kept volumes: the tier's cap at delete time, expiry by age, the owner's list and
removal, start-up recovery, and the housekeeping pass, over a real store and an
in-memory storage method."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rexecd.config import Config
from rexecd.errors import Conflict, NotFound, RuntimeFailure
from rexecd.models import ContainerRecord, ContainerResources, utcnow
from rexecd.runtime.storage import Storage, Volume
from rexecd.runtime.storage.volume import Layout
from rexecd.service.homes import PlainHomes, QuotaHomes
from rexecd.service.manager import ContainerManager
from rexecd.service.store import Store
from rexecd.service.volumes import KeptVolumes

MiB = 1024 * 1024
RES = ContainerResources(memory_mb=512, cpu_shares=1000, disk_mb=100, network_mbps=10)


class MemoryStorage(Storage):
    """Volumes as a dict of sizes; ``fail`` makes destroy of those names fail."""

    def __init__(self, tmp_path: Path) -> None:
        self.lay = Layout(tmp_path / "state", tmp_path / "run")
        self.sizes: dict[tuple[str, str], int] = {}
        self.fail: set[str] = set()

    def ensure(
        self, user_id: str, name: str, size_mb: int, owner: tuple[int, int] = (0, 0)
    ) -> Volume:
        self.sizes[(user_id, name)] = max(size_mb, self.sizes.get((user_id, name), 0))
        return self.lay.volume(user_id, name, self.sizes[(user_id, name)])

    def volume(self, user_id: str, name: str) -> Volume:
        return self.lay.volume(user_id, name, 0)

    def rename(self, user_id: str, old: str, new: str) -> None:
        raise NotImplementedError

    def release(self, vol: Volume) -> None:
        pass

    def wipe_root(self, vol: Volume) -> None:
        pass

    def destroy(self, user_id: str, name: str) -> None:
        if name in self.fail:
            raise RuntimeFailure("remove volume image", "device busy", 16)
        self.sizes.pop((user_id, name), None)

    def resize(self, vol: Volume, size_mb: int) -> Volume:
        raise NotImplementedError

    def usage(self, vol: Volume) -> tuple[int, int]:
        return self.space(vol)

    def space(self, vol: Volume) -> tuple[int, int]:
        size = self.sizes[(vol.user_id, vol.name)] * MiB
        return size // 4, size

    def mounted(self) -> list[Volume]:
        return []

    def stored(self) -> list[tuple[str, str]]:
        return sorted(self.sizes)


@dataclass
class World:
    cfg: Config
    store: Store
    storage: MemoryStorage
    kv: KeptVolumes
    uid: str

    def volume(self, name: str, size_mb: int = 100, used: datetime | None = None) -> None:
        """A volume whose container has just been deleted (kept, last used ``used``)."""
        self.storage.ensure(self.uid, name, size_mb)
        self.store.upsert_volume(self.uid, name, f"/v/{name}", size_mb)
        if used is not None:
            self.store.touch_volume(self.uid, name, used)

    def container(self, name: str) -> ContainerRecord:
        rec = ContainerRecord(user_id=self.uid, name=name, image="busybox", resources=RES)
        self.store.insert_container_checked(rec, 100)
        return rec

    def kept(self) -> list[str]:
        return [v.name for v in self.store.kept_volumes(self.uid)]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    cfg = Config(state_dir=tmp_path / "state")
    cfg.tiers.free.kept_volumes = 3
    cfg.tiers.free.kept_volumes_mb = 1000
    with Store(cfg.state_dir) as store:
        storage = MemoryStorage(tmp_path)
        uid = store.create_user("alice", "free").id
        homes = QuotaHomes(storage, store, None)  # type: ignore[arg-type]
        yield World(cfg, store, storage, KeptVolumes(cfg, store, homes), uid)


def ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


def test_keep_removes_the_least_recently_used_beyond_the_count(world: World) -> None:
    for i, name in enumerate(("a", "b", "c")):
        world.volume(name, used=ago(10 - i))
    world.volume("d", used=ago(20))  # older record, but its container goes now
    assert world.kv.keep(world.uid, "free", "d", 100) == ["a"]
    assert world.kept() == ["b", "c", "d"]
    assert (world.uid, "a") not in world.storage.sizes  # the data went too
    events = world.store.list_events()
    assert [(e.type, e.payload["name"]) for e in events] == [("volume_removed", "a")]
    assert "cap" in events[0].payload["reason"]


def test_keep_holds_the_total_size_and_a_volume_alone_too_big_goes(world: World) -> None:
    world.volume("a", 400, used=ago(3))
    world.volume("b", 400, used=ago(2))
    world.volume("c", 300)
    assert world.kv.keep(world.uid, "free", "c", 300) == ["a"]
    assert world.kept() == ["b", "c"]
    world.volume("huge", 2000)
    assert world.kv.keep(world.uid, "free", "huge", 2000) == ["b", "c", "huge"]
    assert world.kept() == []


def test_volumes_in_use_do_not_count_and_are_never_evicted(world: World) -> None:
    for name in ("a", "b", "c", "d", "e"):
        world.volume(name)
        world.container(name)
    world.volume("f")
    assert world.kv.keep(world.uid, "free", "f", 100) == []
    assert sorted(n for _, n in world.storage.sizes) == ["a", "b", "c", "d", "e", "f"]


def test_a_zero_cap_keeps_nothing(world: World) -> None:
    world.cfg.tiers.free.kept_volumes = 0
    world.volume("a")
    assert world.kv.keep(world.uid, "free", "a", 100) == ["a"]


def test_a_failed_destroy_does_not_fail_the_delete_and_is_retried_at_start_up(
    world: World,
) -> None:
    world.cfg.tiers.free.kept_volumes = 1
    world.volume("a", used=ago(2))
    world.volume("b")
    world.storage.fail.add("a")
    assert world.kv.keep(world.uid, "free", "b", 100) == []
    # Claimed: no container can take the name while its data is half gone.
    assert [v.name for v in world.store.volumes_being_removed()] == ["a"]
    with pytest.raises(Conflict):
        world.container("a")
    world.storage.fail.clear()
    assert world.kv.recover() == [f"{world.uid}/a"]
    assert world.store.volumes_being_removed() == []
    assert (world.uid, "a") not in world.storage.sizes


def test_expire_removes_volumes_unused_for_the_configured_days(world: World) -> None:
    world.cfg.retention.kept_volume_days = 30
    world.volume("old", used=ago(31))
    world.volume("new", used=ago(29))
    world.volume("busy", used=ago(40))
    world.container("busy")
    assert world.kv.expire(utcnow()) == [f"{world.uid}/old"]
    assert world.kept() == ["new"]
    world.cfg.retention.kept_volume_days = None
    assert world.kv.expire(utcnow() + timedelta(days=1000)) == []


def test_listing_shows_use_caps_and_expiry(world: World) -> None:
    world.cfg.retention.kept_volume_days = 10
    world.volume("kept", 200, used=datetime(2030, 1, 1, tzinfo=UTC))
    world.volume("busy", 300)
    rec = world.container("busy")
    out = world.kv.listing(world.uid, "free")
    assert (out.count, out.kept, out.kept_mb) == (2, 1, 200)
    assert (out.kept_limit, out.kept_mb_limit) == (3, 1000)
    busy, kept = out.volumes
    assert busy.in_use and busy.container_id == rec.id and busy.expires_at is None
    assert busy.disk_mb == 300 and busy.used_bytes == 300 * MiB // 4
    assert not kept.in_use and kept.container_id is None
    assert kept.expires_at == datetime(2030, 1, 11, tzinfo=UTC)


def test_remove_by_the_owner(world: World) -> None:
    world.volume("home")
    world.volume("busy")
    world.container("busy")
    other = world.store.create_user("bob", "free").id
    with pytest.raises(NotFound):
        world.kv.remove(world.uid, "nope")
    with pytest.raises(NotFound):
        world.kv.remove(other, "home")
    with pytest.raises(Conflict, match="in use by container busy"):
        world.kv.remove(world.uid, "busy")
    world.kv.remove(world.uid, "home")
    assert world.store.get_volume(world.uid, "home") is None
    assert (world.uid, "home") not in world.storage.sizes
    assert (world.uid, "busy") in world.storage.sizes


def test_recover_records_volumes_the_store_lost(world: World) -> None:
    world.storage.ensure(world.uid, "lost", 64)
    world.storage.ensure("nobody", "orphan", 64)  # no such user: left alone
    assert world.kv.recover() == [f"{world.uid}/lost"]
    rec = world.store.get_volume(world.uid, "lost")
    assert rec is not None and rec.size_mb == 64


def test_plain_directories_without_a_storage_method(world: World, tmp_path: Path) -> None:
    homes = PlainHomes(world.cfg, world.store, None)  # type: ignore[arg-type]
    kv = KeptVolumes(world.cfg, world.store, homes)
    home = homes.plain_dir(world.uid, "a")
    home.mkdir(parents=True)
    (home / "f").write_text("x")
    world.store.upsert_volume(world.uid, "a", str(home), 100)
    assert kv.listing(world.uid, "free").volumes[0].used_bytes is None
    kv.remove(world.uid, "a")
    assert not home.exists()


def test_housekeeping_applies_every_retention_rule(world: World) -> None:
    r = world.cfg.retention
    r.events_max_rows, r.events_max_days, r.kept_volume_days = 5, 30, 30
    now = utcnow()
    for i in range(4):
        world.store.append_event("created", {"i": i}, ts=now - timedelta(days=40))
    for i in range(8):
        world.store.append_event("created", {"i": i})
    world.volume("old", used=ago(31))
    for name in ("a", "b", "c"):
        world.volume(name)
    world.store.set_user_tier(world.uid, "guest")  # a smaller tier: 2 kept volumes
    manager = ContainerManager(world.cfg, world.store, None, None, storage=world.storage)  # type: ignore[arg-type]
    done = manager.housekeeping(now)
    assert done == {"events": 7, "tokens": 0, "volumes_expired": 1, "volumes_over_cap": 1}
    assert world.kept() == ["b", "c"]
    # The trim came first; the two volume_removed events were appended after it.
    assert world.store.count_events() == 5 + 2
