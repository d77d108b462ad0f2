"""Unit tests of the cgroup v2 driver against a fake unified hierarchy in a tmp dir."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexecd.errors import Conflict, InvalidRequest, NotFound, RuntimeFailure
from rexecd.runtime.cgroups import CgroupLimits, IoLimit, open_driver, v2
from rexecd.runtime.cgroups._files import write as real_write
from rexecd.runtime.cgroups.v2 import V2Cgroup, V2Driver


class FakeV2:
    """Just enough of the kernel: mkdir populates interface files, a few writes have
    the kernel's semantics, every write is logged."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.swap_accounting = True
        (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
        (root / "cgroup.subtree_control").write_text("")
        (root / "cgroup.procs").write_text("1\n")
        (root / "cpu.stat").write_text("usage_usec 0\n")

    def rel(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.root))

    def populate(self, d: Path) -> None:
        enabled = (d.parent / "cgroup.subtree_control").read_text().split()
        files = {
            "cgroup.procs": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
            "cgroup.freeze": "0\n",
            "cgroup.kill": "",
            "cgroup.controllers": " ".join(enabled) + "\n",
            "cgroup.subtree_control": "",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
        }
        if "cpu" in enabled:
            files |= {"cpu.max": "max 100000\n", "cpu.weight": "100\n"}
        if "memory" in enabled:
            files |= {
                "memory.max": "max\n",
                "memory.high": "max\n",
                "memory.swap.max": "max\n",
                "memory.current": "0\n",
                "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
            }
        if "pids" in enabled:
            files |= {"pids.max": "max\n", "pids.current": "0\n"}
        if "io" in enabled:
            files |= {"io.max": "", "io.weight": "default 100\n", "io.stat": ""}
        if not self.swap_accounting:
            files.pop("memory.swap.max", None)
        for name, text in files.items():
            (d / name).write_text(text)

    def write(self, path: Path, value: str, step: str | None = None) -> None:
        self.writes.append((self.rel(path), value))
        name = path.name
        if name == "cgroup.subtree_control":
            current = set(path.read_text().split())
            for token in value.split():
                (current.add if token[0] == "+" else current.discard)(token[1:])
            value = " ".join(sorted(current))
        elif name == "cgroup.procs":
            value = " ".join([*path.read_text().split(), value])
        elif name == "cgroup.kill":
            (path.parent / "cgroup.procs").write_text("")
            (path.parent / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        elif name == "io.max" and path.exists():
            # The kernel keeps one line per device and drops a line that is all "max".
            table = {ln.split()[0]: ln for ln in path.read_text().splitlines()}
            table[value.split()[0]] = value
            value = "\n".join(
                ln for ln in table.values() if not all(kv.endswith("=max") for kv in ln.split()[1:])
            )
        real_write(path, value, step)

    def writes_to(self, fname: str) -> list[str]:
        return [v for p, v in self.writes if p.endswith("/" + fname)]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeV2]:
    root = tmp_path / "cgroup"
    root.mkdir()
    fs = FakeV2(root)
    real_mkdir, real_rmdir = os.mkdir, os.rmdir

    def mkdir(path: str | Path, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode)
        if root in Path(path).parents:
            fs.populate(Path(path))

    def rmdir(path: str | Path, *, dir_fd: int | None = None) -> None:
        # The kernel removes a cgroup together with its interface files.
        p = Path(path)
        if root in p.parents and p.is_dir():
            for f in p.iterdir():
                if f.is_file():
                    f.unlink()
        real_rmdir(path)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(v2, "write", fs.write)
    yield fs


def driver(fake: FakeV2, parent: str = "/rexecd", own: str = "/") -> V2Driver:
    return V2Driver(parent, fake.root, proc_cgroup=f"0::{own}\n")


def test_open_driver_probes_the_fake_tree_as_v2(fake: FakeV2) -> None:
    d = open_driver("/rexecd", fake.root, proc_cgroup="0::/\n")
    assert isinstance(d, V2Driver) and d.version == 2


def test_create_enables_controllers_and_writes_limits(fake: FakeV2) -> None:
    d = driver(fake)
    cg = d.create(
        "c1",
        CgroupLimits(
            cpu_millicores=500,
            cpu_weight=200,
            memory_bytes=100 * 1024 * 1024,
            pids_max=64,
            io=[IoLimit(major=8, minor=0, rbps=1_000_000, wiops=50)],
            io_weight=300,
        ),
    )
    assert isinstance(cg, V2Cgroup)
    c = fake.root / "rexecd" / "c1"
    assert (fake.root / "cgroup.subtree_control").read_text() == "cpu io memory pids"
    assert (fake.root / "rexecd" / "cgroup.subtree_control").read_text() == "cpu io memory pids"
    assert (c / "cpu.max").read_text() == "50000 100000"
    assert (c / "cpu.weight").read_text() == "200"
    assert (c / "memory.max").read_text() == str(100 * 1024 * 1024)
    high = int((c / "memory.high").read_text())
    assert high % 4096 == 0 and high == 100 * 1024 * 1024 * 95 // 100 // 4096 * 4096
    assert (c / "memory.swap.max").read_text() == "0"
    assert (c / "pids.max").read_text() == "64"
    assert fake.writes_to("io.max") == ["8:0 rbps=1000000 wbps=max riops=max wiops=50"]
    assert (c / "io.weight").read_text() == "default 300"
    assert cg.join_paths() == [str(c / "cgroup.procs")]
    assert d.list() == ["c1"]


def test_defaults_lift_limits_and_keep_pids_cap(fake: FakeV2) -> None:
    driver(fake).create("c1", CgroupLimits())
    c = fake.root / "rexecd" / "c1"
    assert (c / "cpu.max").read_text() == "max 100000"
    assert (c / "memory.max").read_text() == "max"
    assert (c / "memory.swap.max").read_text() == "max"
    assert (c / "pids.max").read_text() == "512"
    assert fake.writes_to("io.max") == []


def test_controllers_enabled_only_where_needed(fake: FakeV2) -> None:
    (fake.root / "cgroup.subtree_control").write_text("cpu memory io pids")
    driver(fake).create("c1", CgroupLimits())
    written = [p for p, _ in fake.writes if p.endswith("subtree_control")]
    assert written == ["/rexecd/cgroup.subtree_control"]


def test_controllers_the_host_lacks_are_not_requested(fake: FakeV2) -> None:
    (fake.root / "cgroup.controllers").write_text("cpu memory pids\n")
    d = driver(fake)
    d.create("c1", CgroupLimits(cpu_millicores=100))
    assert fake.writes_to("cgroup.subtree_control")[0] == "+cpu +memory +pids"
    assert d.available() == {
        "cpu": True,
        "memory": True,
        "io": False,
        "pids": True,
        "freezer": True,
        "kill": True,
        "devices": False,
    }
    with pytest.raises(RuntimeFailure) as err:
        d.create("c2", CgroupLimits(io=[IoLimit(major=8, minor=0, wbps=1)]))
    assert err.value.step == "cgroup write io.max"
    assert str(fake.root / "rexecd" / "c2" / "io.max") in str(err.value)
    assert not (fake.root / "rexecd" / "c2").exists()  # rolled back


def test_live_update_is_declarative(fake: FakeV2) -> None:
    cg = driver(fake).create(
        "c1",
        CgroupLimits(
            cpu_millicores=500,
            memory_bytes=1 << 30,
            io=[IoLimit(major=8, minor=0, wbps=10), IoLimit(major=8, minor=16, rbps=5)],
        ),
    )
    c = fake.root / "rexecd" / "c1"
    cg.apply(CgroupLimits(cpu_millicores=1500, io=[IoLimit(major=8, minor=16, rbps=7)]))
    assert (c / "cpu.max").read_text() == "150000 100000"
    assert (c / "memory.max").read_text() == "max"
    assert (c / "memory.high").read_text() == "max"
    assert fake.writes_to("io.max")[-2:] == [
        "8:0 rbps=max wbps=max riops=max wiops=max",
        "8:16 rbps=7 wbps=max riops=max wiops=max",
    ]


def test_missing_swap_accounting_is_skipped(fake: FakeV2) -> None:
    fake.swap_accounting = False
    driver(fake).create("c1", CgroupLimits(memory_bytes=1 << 20))
    assert fake.writes_to("memory.swap.max") == []


def test_delegated_cgroup_moves_the_daemon_into_a_leaf(fake: FakeV2) -> None:
    # systemd Delegate=yes: the unit cgroup is ours, has the controllers, holds the daemon.
    unit = fake.root / "system.slice" / "rexecd.service"
    (fake.root / "cgroup.subtree_control").write_text("cpu io memory pids")
    os.mkdir(fake.root / "system.slice")
    (fake.root / "system.slice" / "cgroup.subtree_control").write_text("cpu io memory pids")
    os.mkdir(unit)
    (unit / "cgroup.procs").write_text("4242\n")
    own = "/system.slice/rexecd.service"
    d = driver(fake, parent="containers", own=own)
    assert d.parent == own + "/containers"
    d.create("c1", CgroupLimits())
    assert ("/system.slice/rexecd.service/daemon/cgroup.procs", "4242") in fake.writes
    assert (unit / "cgroup.subtree_control").read_text() == "cpu io memory pids"
    assert (unit / "containers" / "c1" / "pids.max").read_text() == "512"
    # A driver made again later, from inside the leaf, resolves the same parent.
    again = driver(fake, parent="containers", own=own + "/daemon")
    assert again.parent == d.parent and again.list() == ["c1"]


def test_refuses_to_evict_processes_from_a_cgroup_not_ours(fake: FakeV2) -> None:
    (fake.root / "cgroup.subtree_control").write_text("cpu io memory pids")
    other = fake.root / "busy"
    os.mkdir(other)
    (other / "cgroup.procs").write_text("77\n")
    with pytest.raises(RuntimeFailure) as err:
        driver(fake, parent="/busy/rexecd").create("c1", CgroupLimits())
    assert err.value.step == "cgroup enable controllers"
    assert not any(p.startswith("/busy/") and p.endswith("cgroup.procs") for p, _ in fake.writes)


def test_open_list_conflict_and_names(fake: FakeV2) -> None:
    d = driver(fake)
    assert d.list() == []
    d.create("a", CgroupLimits())
    with pytest.raises(Conflict):
        d.create("a", CgroupLimits())
    assert d.open("a").name == "a"
    with pytest.raises(NotFound):
        d.open("b")
    for bad in ("", "../x", "a/b", "memory.max", ".", "x" * 129):
        with pytest.raises(InvalidRequest):
            d.create(bad, CgroupLimits())


def test_stats_parsing(fake: FakeV2) -> None:
    cg = driver(fake).create("c1", CgroupLimits(memory_bytes=1 << 30))
    c = fake.root / "rexecd" / "c1"
    (c / "cpu.stat").write_text("usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n")
    (c / "memory.current").write_text("5000000\n")
    (c / "memory.events").write_text("low 0\nhigh 3\nmax 9\noom 2\noom_kill 2\n")
    (c / "pids.current").write_text("7\n")
    (c / "io.stat").write_text(
        "8:0 rbytes=1000 wbytes=2000 rios=1 wios=2 dbytes=0 dios=0\n"
        "8:16 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n"
    )
    s = cg.stats()
    assert (s.cpu_usage_usec, s.memory, s.memory_limit, s.pids) == (123456, 5000000, 1 << 30, 7)
    assert (s.io_read_bytes, s.io_write_bytes, s.oom_kills) == (1010, 2020, 2)
    cg.apply(CgroupLimits())
    assert cg.stats().memory_limit is None


def test_oom_fd_is_an_inotify_watch_on_memory_events(fake: FakeV2) -> None:
    cg = driver(fake).create("c1", CgroupLimits(memory_bytes=1 << 20))
    fd = cg.oom_fd()
    assert fd is not None
    try:
        assert select.select([fd], [], [], 0)[0] == []
        (fake.root / "rexecd" / "c1" / "memory.events").write_text("oom 1\noom_kill 1\n")
        assert select.select([fd], [], [], 2)[0] == [fd]
        os.read(fd, 4096)
        assert cg.stats().oom_kills == 1
    finally:
        os.close(fd)


def test_inotify_watch_of_a_missing_path_names_it_and_leaks_no_fd(tmp_path: Path) -> None:
    from rexecd import _native as n

    before = len(os.listdir("/proc/self/fd"))
    missing = tmp_path / "gone" / "memory.events"
    with pytest.raises(OSError) as info:
        n.inotify_watch(str(missing), n.IN_MODIFY)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(missing)
    assert len(os.listdir("/proc/self/fd")) == before


def test_kill_uses_cgroup_kill_and_destroy_is_idempotent(fake: FakeV2) -> None:
    d = driver(fake)
    cg = d.create("c1", CgroupLimits())
    c = fake.root / "rexecd" / "c1"
    (c / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert cg.is_populated()
    cg.destroy(timeout=2)
    assert fake.writes_to("cgroup.kill") == ["1"]
    assert not c.exists()
    cg.destroy(timeout=2)
    assert d.list() == []
    d.remove_parent()
    d.remove_parent()
    assert not (fake.root / "rexecd").exists()


def test_kill_reports_a_cgroup_that_does_not_empty(fake: FakeV2) -> None:
    cg = driver(fake).create("c1", CgroupLimits())
    c = fake.root / "rexecd" / "c1"
    (c / "cgroup.kill").unlink()  # pre-5.14 kernel: freeze + SIGKILL loop
    (c / "cgroup.procs").write_text("999999999\n")  # no such process
    with pytest.raises(RuntimeFailure) as err:
        cg.kill(timeout=0.3)
    assert err.value.step == "cgroup kill"
    assert fake.writes_to("cgroup.freeze")[:2] == ["1", "0"]
