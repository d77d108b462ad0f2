"""Recording fakes of what the lifecycle part drives (store leases, volumes, runtime,
network), for unit tests of a start's rollback without root: every fake writes what
it makes and undoes into one ``Journal``, and can be told to fail at one step."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rexecd.config import CgroupConfig, Config, LxcfsConfig
from rexecd.errors import RuntimeFailure
from rexecd.models import ContainerRecord
from rexecd.runtime import userns
from rexecd.runtime.container import ContainerDirs
from rexecd.runtime.spec import UsernsSpec
from rexecd.service.events import EventBus
from rexecd.service.hostside import HostSide
from rexecd.service.lifecycle import Lifecycle
from rexecd.service.limits import CgroupPolicy
from rexecd.service.progress import Background
from rexecd.service.publisher import Publisher
from rexecd.service.records import Records
from tests.unit.fakes.store import RES

# The steps of a start in the order they are made (the runtime's start makes the
# cgroup, spawns, attaches the network while the child waits, then lets it go).
STEPS = ("userns", "volume", "address", "cgroup", "spawn", "attach", "go")


@dataclass
class Journal:
    """What the fakes did, in order: ("make", step) and ("undo", step)."""

    fail_at: str | None = None
    entries: list[tuple[str, str]] = field(default_factory=list)

    def make(self, step: str) -> None:
        if step == self.fail_at:
            raise RuntimeFailure(step, f"{step} failed (told to)")
        self.entries.append(("make", step))

    def undo(self, step: str) -> None:
        self.entries.append(("undo", step))

    def undone(self) -> list[str]:
        return [step for kind, step in self.entries if kind == "undo"]

    def made(self) -> list[str]:
        return [step for kind, step in self.entries if kind == "make"]


class FakeStore:
    """The store calls a start makes: id range and address leases, the owner, and the
    record itself (for the state move of a start that succeeds)."""

    def __init__(self, journal: Journal, rec: ContainerRecord) -> None:
        self.journal, self.rec = journal, rec

    def allocate_userns(self, db_id: str, count: int, *, per_user: bool = False) -> int:
        self.journal.make("userns")
        return 0

    def release_userns(self, db_id: str) -> None:
        self.journal.undo("userns")

    def allocate_ip(self, db_id: str, subnet: object) -> str:
        self.journal.make("address")
        return "10.88.0.2"

    def release_ips(self, db_id: str) -> None:
        self.journal.undo("address")

    def get_user(self, user_id: str) -> Any:
        return SimpleNamespace(name="alice", tier="free")

    def get_container(self, db_id: str) -> ContainerRecord:
        return self.rec

    def update_container(self, db_id: str, **fields: Any) -> ContainerRecord:
        self.rec = self.rec.model_copy(update=fields)
        return self.rec

    def append_event(self, *args: Any, **kwargs: Any) -> None:
        pass


class FakeHomes:
    renames_restart = True
    can_shrink = False

    def __init__(self, journal: Journal, root: Path) -> None:
        self.journal, self.root = journal, root

    def prepare(
        self, rec: ContainerRecord, owner: tuple[int, int]
    ) -> tuple[ContainerDirs, Path, Path]:
        self.journal.make("volume")
        base = self.root / rec.id
        dirs = ContainerDirs(base=base, upper=base / "upper", work=base / "work", rootfs=base / "r")
        # Paths that do not exist: nothing to move into the id range (that needs root).
        return dirs, base / "home", base / "upper"

    def release(self, rec: ContainerRecord) -> None:
        self.journal.undo("volume")

    def device(self, rec: ContainerRecord) -> tuple[int, int] | None:
        return None


class FakeRuntime:
    """Id ranges, spec building and a start that makes a cgroup, spawns, runs the
    network hook and lets the child go, failing where the journal says."""

    cgroups = None
    userns = userns.IdRanges(base=1 << 20, size=65536, count=4)

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.kills = 0

    def create_dirs(self, dirs: ContainerDirs, rng: UsernsSpec | None) -> None:
        pass

    def build_spec(self, cid: str, hostname: str, *args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(process=SimpleNamespace(uid=0, gid=0, env=[]))

    def start(self, spec: Any, limits: Any, *, on_ready: Any = None, stdio: Any = None) -> int:
        self.journal.make("cgroup")
        self.journal.make("spawn")
        if on_ready is not None:
            on_ready(os.getpid())
        self.journal.make("go")
        return os.getpid()

    def release(self, cid: str) -> None:
        # Cgroup and mount point: whatever of them exists.
        self.journal.undo("runtime")

    def kill_cgroup(self, cid: str) -> None:
        self.kills += 1


class FakeNetwork:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def attach(
        self, container_id: str, pid: int, ip: str, mbps: int | None, group: str | None = None
    ) -> object:
        self.journal.make("attach")
        return None

    def detach(self, container_id: str) -> None:
        self.journal.undo("attach")

    def write_etc_files(self, *args: Any) -> None:
        pass


class FakeImages:
    def __init__(self, layer: Path) -> None:
        self.layer = layer

    def layer_paths(self, image: Any) -> list[Path]:
        return [self.layer]


class FakeLogs:
    def open_capture(self, cid: str) -> list[int]:
        return []

    def drop_capture(self, cid: str) -> None:
        pass


class FakeWatcher:
    def __init__(self) -> None:
        self.watched: list[str] = []

    def watch(self, rec: ContainerRecord) -> None:
        self.watched.append(rec.db_id)


@dataclass
class World:
    journal: Journal
    store: FakeStore
    watcher: FakeWatcher
    lifecycle: Lifecycle
    rec: ContainerRecord
    image: Any = field(
        default_factory=lambda: SimpleNamespace(
            config=SimpleNamespace(env=[], entrypoint=None, cmd=None, working_dir="", user="")
        )
    )


def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str | None = None) -> World:
    """A lifecycle part over recording fakes; a start of ``world.rec`` fails at ``fail_at``."""
    # /etc files are shifted into the id range by chown: root's work, not this test's.
    monkeypatch.setattr(userns, "shift_tree", lambda *a: 0)
    journal = Journal(fail_at)
    cfg = Config(
        state_dir=tmp_path / "state",
        cgroup=CgroupConfig(allow_unlimited=True),
        lxcfs=LxcfsConfig(mode="off"),
    )
    rec = ContainerRecord(user_id="u1", name="box", image="busybox", resources=RES)
    store = FakeStore(journal, rec)
    runtime = FakeRuntime(journal)
    homes = FakeHomes(journal, tmp_path / "volumes")
    network = FakeNetwork(journal)
    layer = tmp_path / "layer"
    layer.mkdir()
    host = HostSide(cfg, store, runtime, network, homes, None)  # type: ignore[arg-type]
    policy = CgroupPolicy(cfg, store, runtime, homes, "no cgroups in a unit test")  # type: ignore[arg-type]
    records = Records(store)  # type: ignore[arg-type]
    publisher = Publisher(cfg, store, EventBus(), Background())  # type: ignore[arg-type]
    watcher = FakeWatcher()
    lifecycle = Lifecycle(
        cfg, store, runtime, FakeImages(layer), network, host, policy, records,  # type: ignore[arg-type]
        publisher, watcher, FakeLogs(), None,  # type: ignore[arg-type]
    )  # fmt: skip
    return World(journal, store, watcher, lifecycle, rec)
