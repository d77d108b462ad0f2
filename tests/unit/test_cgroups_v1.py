"""Unit tests of the cgroup v1 driver against fake per-controller hierarchies in a tmp dir."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexecd.errors import Conflict, NotFound, RuntimeFailure
from rexecd.runtime.cgroups import CgroupLimits, IoLimit, open_driver, v1
from rexecd.runtime.cgroups._files import write as real_write
from rexecd.runtime.cgroups.v1 import DEVICE_ALLOW, V1Cgroup, V1Driver, cpu_shares

UNLIMITED = "9223372036854771712"


class FakeV1:
    """Fake v1 hierarchies: mkdir populates each controller's files, the memory limits
    keep the kernel's memsw >= memory rule, throttle files keep one rule per device."""

    def __init__(self, root: Path, comount: bool = False, swap: bool = True) -> None:
        self.root = root
        self.swap = swap
        self.writes: list[tuple[str, str]] = []
        mounts = ["memory", "pids", "blkio", "freezer", "devices"]
        mounts += ["cpu,cpuacct"] if comount else ["cpu", "cpuacct"]
        for m in mounts:
            (root / m).mkdir(parents=True)
            (root / m / "cgroup.procs").write_text("1\n")
        if comount:
            (root / "cpu").symlink_to("cpu,cpuacct")
            (root / "cpuacct").symlink_to("cpu,cpuacct")
        if swap:
            (root / "memory" / "memory.memsw.limit_in_bytes").write_text(UNLIMITED)

    def rel(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.root))

    def populate(self, d: Path) -> None:
        controllers = d.relative_to(self.root).parts[0].split(",")
        files = {"cgroup.procs": "", "tasks": ""}
        if "cpu" in controllers:
            files |= {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "1024"}
        if "cpuacct" in controllers:
            files |= {"cpuacct.usage": "0"}
        if "memory" in controllers:
            files |= {
                "memory.limit_in_bytes": UNLIMITED,
                "memory.usage_in_bytes": "0",
                "memory.failcnt": "0",
                "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
                "cgroup.event_control": "",
            }
            if self.swap:
                files["memory.memsw.limit_in_bytes"] = UNLIMITED
        if "pids" in controllers:
            files |= {"pids.max": "max", "pids.current": "0"}
        if "blkio" in controllers:
            files |= {fname: "" for _, fname in v1._THROTTLE}
            files |= {"blkio.throttle.io_service_bytes_recursive": "Total 0\n"}
            files |= {"blkio.bfq.weight": "100"}
        if "freezer" in controllers:
            files |= {"freezer.state": "THAWED"}
        if "devices" in controllers:
            files |= {"devices.allow": "", "devices.deny": "", "devices.list": "a *:* rwm"}
        for name, text in files.items():
            (d / name).write_text(text)

    def write(self, path: Path, value: str, step: str | None = None) -> None:
        self.writes.append((self.rel(path), value))
        name = path.name

        def limit(p: Path) -> int:
            return int(p.read_text()) if p.exists() else -1

        def unl(v: int) -> int:
            return (1 << 63) if v == -1 or v >= 1 << 62 else v

        memsw = path.parent / "memory.memsw.limit_in_bytes"
        mem = path.parent / "memory.limit_in_bytes"
        if (
            name == "memory.limit_in_bytes" and self.swap and unl(int(value)) > unl(limit(memsw))
        ) or (name == memsw.name and unl(int(value)) < unl(limit(mem))):
            raise RuntimeFailure(f"cgroup write {name}", "Invalid argument", errno.EINVAL)
        if name.startswith("blkio.throttle.") and path.exists():
            table = {ln.split()[0]: ln for ln in path.read_text().splitlines()}
            dev = value.split()[0]
            table[dev] = value
            value = "\n".join(ln for ln in table.values() if ln.split()[1] != "0")
        if name == "cgroup.procs" and path.exists():
            value = " ".join([*path.read_text().split(), value])
        real_write(path, value, step)

    def writes_to(self, fname: str) -> list[str]:
        return [v for p, v in self.writes if p.endswith("/" + fname)]


def make_fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, comount: bool = False, swap: bool = True
) -> FakeV1:
    root = tmp_path / "cgroup"
    fs = FakeV1(root, comount=comount, swap=swap)
    real_mkdir, real_rmdir = os.mkdir, os.rmdir

    def mkdir(path: str | Path, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode)
        if root in Path(path).parents:
            fs.populate(Path(path))

    def rmdir(path: str | Path, *, dir_fd: int | None = None) -> None:
        p = Path(path)
        if root in p.parents and p.is_dir():
            for f in p.iterdir():
                if f.is_file():
                    f.unlink()
        real_rmdir(path)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(v1, "write", fs.write)
    return fs


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeV1]:
    yield make_fake(tmp_path, monkeypatch)


def driver(fake: FakeV1, parent: str = "/rexecd", proc: str = "0::/\n") -> V1Driver:
    return V1Driver(parent, fake.root, proc_cgroup=proc)


def test_open_driver_probes_the_fake_tree_as_v1(fake: FakeV1) -> None:
    d = open_driver("/rexecd", fake.root, proc_cgroup="0::/\n")
    assert isinstance(d, V1Driver) and d.version == 1


def test_create_writes_every_hierarchy(fake: FakeV1) -> None:
    d = driver(fake)
    cg = d.create(
        "c1",
        CgroupLimits(
            cpu_millicores=500,
            cpu_weight=200,
            memory_bytes=256 << 20,
            pids_max=64,
            io=[IoLimit(major=254, minor=0, rbps=1000, wbps=2000, riops=10)],
            io_weight=300,
        ),
    )
    assert isinstance(cg, V1Cgroup)
    r = fake.root

    def f(ctrl: str, fname: str) -> str:
        return (r / ctrl / "rexecd" / "c1" / fname).read_text()

    assert f("cpu", "cpu.cfs_period_us") == "100000"
    assert f("cpu", "cpu.cfs_quota_us") == "50000"
    assert f("cpu", "cpu.shares") == "2048"
    assert f("memory", "memory.limit_in_bytes") == str(256 << 20)
    assert f("memory", "memory.memsw.limit_in_bytes") == str(256 << 20)
    assert f("pids", "pids.max") == "64"
    assert f("blkio", "blkio.throttle.read_bps_device") == "254:0 1000"
    assert f("blkio", "blkio.throttle.write_bps_device") == "254:0 2000"
    assert f("blkio", "blkio.throttle.read_iops_device") == "254:0 10"
    assert f("blkio", "blkio.throttle.write_iops_device") == ""
    assert f("blkio", "blkio.bfq.weight") == "300"
    assert fake.writes_to("devices.deny") == ["a"]
    assert fake.writes_to("devices.allow") == list(DEVICE_ALLOW)
    assert {"c 1:3 rwm", "c 1:9 rwm", "c 5:2 rwm", "c 136:* rwm"} <= set(DEVICE_ALLOW)
    assert len(cg.join_paths()) == 7
    assert str(r / "freezer" / "rexecd" / "c1" / "cgroup.procs") in cg.join_paths()
    assert d.list() == ["c1"]


def test_defaults(fake: FakeV1, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new cgroup keeps the kernel's defaults where the limits ask for none (nothing
    written there); a live update back to no limits writes them out."""
    writes: list[str] = []
    real = v1.write

    def recording(path: Path, value: str, step: str | None = None) -> None:
        writes.append(path.name)
        real(path, value, step)

    monkeypatch.setattr(v1, "write", recording)
    cg = driver(fake).create("c1", CgroupLimits())
    assert set(writes) == {"devices.deny", "devices.allow", "pids.max"}
    c = fake.root / "{}" / "rexecd" / "c1"
    assert (Path(str(c).format("cpu")) / "cpu.shares").read_text() == "1024"
    assert (Path(str(c).format("memory")) / "memory.limit_in_bytes").read_text() == UNLIMITED
    assert (Path(str(c).format("pids")) / "pids.max").read_text() == "512"
    cg.apply(CgroupLimits(memory_bytes=1 << 30, cpu_millicores=500))
    cg.apply(CgroupLimits())
    assert (Path(str(c).format("cpu")) / "cpu.cfs_quota_us").read_text() == "-1"
    assert (Path(str(c).format("cpu")) / "cpu.shares").read_text() == "1024"
    assert (Path(str(c).format("memory")) / "memory.limit_in_bytes").read_text() == "-1"
    assert (Path(str(c).format("blkio")) / "blkio.bfq.weight").read_text() == "100"


def test_create_writes_the_limits_asked_for(fake: FakeV1) -> None:
    limits = CgroupLimits(memory_bytes=1 << 30, cpu_millicores=500, cpu_weight=200)
    driver(fake).create("c1", limits)
    c = fake.root / "{}" / "rexecd" / "c1"
    assert (Path(str(c).format("cpu")) / "cpu.cfs_quota_us").read_text() == "50000"
    assert (Path(str(c).format("cpu")) / "cpu.shares").read_text() == "2048"
    assert (Path(str(c).format("memory")) / "memory.limit_in_bytes").read_text() == str(1 << 30)


def test_cpu_shares_mapping() -> None:
    assert cpu_shares(None) == 1024
    assert cpu_shares(100) == 1024
    assert cpu_shares(1) == 10
    assert cpu_shares(10000) == 102400


def test_memory_live_updates_keep_memsw_ordering(fake: FakeV1) -> None:
    cg = driver(fake).create("c1", CgroupLimits(memory_bytes=1 << 30))
    m = fake.root / "memory" / "rexecd" / "c1"
    for mem in (256 << 20, 2 << 30, None, 64 << 20):
        cg.apply(CgroupLimits(memory_bytes=mem))
        want = "-1" if mem is None else str(mem)
        assert (m / "memory.limit_in_bytes").read_text() == want
        assert (m / "memory.memsw.limit_in_bytes").read_text() == want


def test_no_swap_accounting_skips_memsw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake(tmp_path, monkeypatch, swap=False)
    d = driver(fake)
    d.create("c1", CgroupLimits(memory_bytes=1 << 30))
    assert fake.writes_to("memory.memsw.limit_in_bytes") == []
    assert fake.writes_to("memory.limit_in_bytes") == [str(1 << 30)]
    assert d.available()["memsw"] is False


def test_throttle_live_update_removes_stale_rules(fake: FakeV1) -> None:
    cg = driver(fake).create(
        "c1",
        CgroupLimits(io=[IoLimit(major=8, minor=0, wbps=5), IoLimit(major=8, minor=16, wbps=6)]),
    )
    cg.apply(CgroupLimits(io=[IoLimit(major=8, minor=16, wbps=7)]))
    assert fake.writes_to("blkio.throttle.write_bps_device")[-2:] == ["8:0 0", "8:16 7"]
    wbps = fake.root / "blkio" / "rexecd" / "c1" / "blkio.throttle.write_bps_device"
    assert wbps.read_text() == "8:16 7"


def test_comounted_cpu_cpuacct_is_one_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake(tmp_path, monkeypatch, comount=True)
    cg = driver(fake).create("c1", CgroupLimits(cpu_millicores=250))
    joined = cg.join_paths()
    assert len(joined) == 6
    assert str(fake.root / "cpu,cpuacct" / "rexecd" / "c1" / "cgroup.procs") in joined
    assert (fake.root / "cpu" / "rexecd" / "c1" / "cpu.cfs_quota_us").read_text() == "25000"
    (fake.root / "cpu" / "rexecd" / "c1" / "cpuacct.usage").write_text("2000000\n")
    assert cg.stats().cpu_usage_usec == 2000


def test_relative_parent_follows_own_cgroup_per_hierarchy(fake: FakeV1) -> None:
    proc = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"
    for ctrl in ("memory",):
        (fake.root / ctrl / "process_api" / "abc").mkdir(parents=True)
    d = driver(fake, parent="rexecd", proc=proc)
    d.create("c1", CgroupLimits())
    assert (fake.root / "memory" / "process_api" / "abc" / "rexecd" / "c1").is_dir()
    assert (fake.root / "cpu" / "rexecd" / "c1").is_dir()


def test_missing_controller_fails_clearly_and_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake(tmp_path, monkeypatch)
    (fake.root / "pids" / "cgroup.procs").unlink()  # pids not mounted
    d = driver(fake)
    assert d.available()["pids"] is False
    with pytest.raises(RuntimeFailure) as err:
        d.create("c1", CgroupLimits(pids_max=100))
    assert err.value.step == "cgroup write pids.max"
    assert err.value.errno == errno.ENOENT
    assert d.list() == []
    d.create("c1", CgroupLimits(pids_max=None))
    assert d.list() == ["c1"]


def test_kernel_error_carries_step_and_path(fake: FakeV1) -> None:
    d = driver(fake)
    d.create("c1", CgroupLimits())
    cg = d.open("c1")
    (fake.root / "cpu" / "rexecd" / "c1" / "cpu.cfs_quota_us").unlink()
    with pytest.raises(RuntimeFailure) as err:
        cg.apply(CgroupLimits(cpu_millicores=100))
    assert err.value.step == "cgroup write cpu.cfs_quota_us"
    assert str(fake.root / "cpu" / "rexecd" / "c1" / "cpu.cfs_quota_us") in err.value.message


def test_stats_parsing(fake: FakeV1) -> None:
    cg = driver(fake).create("c1", CgroupLimits(memory_bytes=1 << 30))
    c = fake.root / "{}" / "rexecd" / "c1"

    def put(ctrl: str, fname: str, text: str) -> None:
        (Path(str(c).format(ctrl)) / fname).write_text(text)

    put("cpuacct", "cpuacct.usage", "1234567890\n")
    put("memory", "memory.usage_in_bytes", "4096000\n")
    put("memory", "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    put("pids", "pids.current", "5\n")
    put(
        "blkio",
        "blkio.throttle.io_service_bytes_recursive",
        "254:0 Read 100\n254:0 Write 200\n254:0 Sync 300\n254:0 Async 0\n"
        "254:0 Discard 0\n254:0 Total 300\n7:0 Read 1\n7:0 Write 2\nTotal 303\n",
    )
    s = cg.stats()
    assert (s.cpu_usage_usec, s.memory, s.memory_limit, s.pids) == (1234567, 4096000, 1 << 30, 5)
    assert (s.io_read_bytes, s.io_write_bytes, s.oom_kills) == (101, 202, 3)
    put("memory", "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n")  # before 4.13
    put("memory", "memory.failcnt", "9\n")
    put("memory", "memory.limit_in_bytes", UNLIMITED)
    s = cg.stats()
    assert (s.oom_kills, s.memory_limit) == (9, None)


def test_oom_fd_registers_an_eventfd_on_oom_control(fake: FakeV1) -> None:
    cg = driver(fake).create("c1", CgroupLimits(memory_bytes=1 << 30))
    fd = cg.oom_fd()
    assert fd is not None
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        (line,) = fake.writes_to("cgroup.event_control")
        efd, cfd = line.split()
        assert int(efd) == fd and int(cfd) >= 0
    finally:
        os.close(fd)


def test_kill_freezes_and_thaws_and_times_out_on_stuck_cgroup(fake: FakeV1) -> None:
    cg = driver(fake).create("c1", CgroupLimits())
    (fake.root / "pids" / "rexecd" / "c1" / "cgroup.procs").write_text("999999999\n")
    assert cg.is_populated()
    with pytest.raises(RuntimeFailure) as err:
        cg.kill(timeout=0.3)
    assert err.value.step == "cgroup kill"
    states = fake.writes_to("freezer.state")
    assert states[:2] == ["FROZEN", "THAWED"] and states[-1] == "THAWED"


def test_open_list_destroy_idempotent(fake: FakeV1) -> None:
    d = driver(fake)
    with pytest.raises(NotFound):
        d.open("c1")
    d.create("c1", CgroupLimits())
    with pytest.raises(Conflict):
        d.create("c1", CgroupLimits())
    assert (fake.root / "memory" / "rexecd" / "c1").is_dir()  # the conflict undid nothing
    cg = d.open("c1")
    cg.destroy(timeout=1)
    cg.destroy(timeout=1)
    assert d.list() == []
    assert not any((fake.root / c / "rexecd" / "c1").exists() for c in ("cpu", "memory"))
    d.remove_parent()
    d.remove_parent()
    assert not (fake.root / "memory" / "rexecd").exists()


def test_available(fake: FakeV1) -> None:
    assert driver(fake).available() == {
        "cpu": True,
        "cpuacct": True,
        "memory": True,
        "pids": True,
        "blkio": True,
        "freezer": True,
        "devices": True,
        "io": True,
        "memsw": True,
        "kill": False,
    }


def test_subtree_dirs_leaf_nested_and_missing(tmp_path: Path) -> None:
    """A leaf (no subdirectory: link count 2 where the file system counts them) is
    returned without listing its files; nested cgroups come deepest first either way."""
    from rexecd.runtime.cgroups._files import subtree_dirs

    leaf = tmp_path / "leaf"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")
    assert subtree_dirs(leaf) == [leaf]
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "c").mkdir()
    (top / "cgroup.procs").write_text("")
    got = subtree_dirs(top)
    assert sorted(got) == sorted([top, top / "a", top / "a" / "b", top / "c"])
    assert got.index(top / "a" / "b") < got.index(top / "a") < got.index(top)
    assert got[-1] == top
    assert subtree_dirs(tmp_path / "absent") == []
