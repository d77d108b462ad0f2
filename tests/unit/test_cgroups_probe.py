"""Unit tests of the cgroup layout probe, parent placement and the limit models."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rexecd.errors import InvalidRequest, RuntimeUnavailable
from rexecd.runtime.cgroups import CgroupLimits, IoLimit, check_name, probe
from rexecd.runtime.cgroups.placement import own_cgroups, resolve_parent, strip_daemon_leaf

PURE_V2 = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
"""

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def mounts(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "mounts"
    f.write_text(text)
    return f


def test_probe_pure_v2(tmp_path: Path) -> None:
    assert probe(Path("/sys/fs/cgroup"), mounts=mounts(tmp_path, PURE_V2)) == 2
    assert probe(Path("/sys/fs/cgroup/"), mounts=mounts(tmp_path, PURE_V2)) == 2


def test_probe_hybrid_is_v1_not_the_empty_unified_mount(tmp_path: Path) -> None:
    assert probe(Path("/sys/fs/cgroup"), mounts=mounts(tmp_path, HYBRID)) == 1
    # Asked about the unified mount itself, it is a v2 root.
    assert probe(Path("/sys/fs/cgroup/unified"), mounts=mounts(tmp_path, HYBRID)) == 2


def test_probe_last_mount_on_a_point_wins(tmp_path: Path) -> None:
    point = tmp_path / "cg"
    text = f"cgroup2 {point} cgroup2 rw 0 0\n"
    assert probe(point, mounts=mounts(tmp_path, text)) == 2
    with pytest.raises(RuntimeUnavailable):
        probe(point, mounts=mounts(tmp_path, text + f"tmpfs {point} tmpfs rw 0 0\n"))


def test_probe_unescapes_mount_points(tmp_path: Path) -> None:
    text = "cgroup2 /srv/my\\040cgroups cgroup2 rw 0 0\n"
    assert probe(Path("/srv/my cgroups"), mounts=mounts(tmp_path, text)) == 2


def test_probe_falls_back_to_files_for_a_plain_directory(tmp_path: Path) -> None:
    empty = mounts(tmp_path, "")
    v2root = tmp_path / "v2"
    v2root.mkdir()
    (v2root / "cgroup.controllers").write_text("cpu memory\n")
    assert probe(v2root, mounts=empty) == 2
    v1root = tmp_path / "v1"
    (v1root / "memory").mkdir(parents=True)
    (v1root / "memory" / "cgroup.procs").write_text("")
    assert probe(v1root, mounts=empty) == 1
    with pytest.raises(RuntimeUnavailable):
        probe(tmp_path / "nothing", mounts=empty)


def test_probe_this_machine() -> None:
    assert probe() in (1, 2)


def test_own_cgroups_parsing() -> None:
    text = "9:name=systemd:/init.scope\n4:memory:/a/b\n2:cpu,cpuacct:/c\n0::/system.slice/x\n"
    own = own_cgroups(text)
    assert own[""] == "/system.slice/x"
    assert own["memory"] == "/a/b"
    assert own["cpu"] == own["cpuacct"] == "/c"
    assert own["name=systemd"] == "/init.scope"


def test_resolve_parent() -> None:
    assert resolve_parent("/rexecd", "/system.slice/x.service") == "/rexecd"
    assert resolve_parent("containers", "/system.slice/x.service") == (
        "/system.slice/x.service/containers"
    )
    assert resolve_parent("rexecd", "/") == "/rexecd"
    assert resolve_parent("/a//b/", "/") == "/a/b"
    for bad in ("", "/", "../x", "a/../../b", "./x"):
        with pytest.raises(InvalidRequest):
            resolve_parent(bad, "/own")


def test_strip_daemon_leaf() -> None:
    assert strip_daemon_leaf("/system.slice/r.service/daemon") == "/system.slice/r.service"
    assert strip_daemon_leaf("/system.slice/r.service") == "/system.slice/r.service"
    assert strip_daemon_leaf("/daemon") == "/"


def test_check_name() -> None:
    assert check_name("abc-123_X") == "abc-123_X"
    for bad in ("", "-x", "a.b", "a/b", "..", "x" * 129, "cgroup.procs"):
        with pytest.raises(InvalidRequest):
            check_name(bad)


def test_limits_validation() -> None:
    assert CgroupLimits().pids_max == 512
    assert CgroupLimits().io == []
    for bad in (
        {"cpu_millicores": 5},
        {"cpu_weight": 0},
        {"cpu_weight": 10001},
        {"memory_bytes": 100},
        {"pids_max": 0},
        {"io_weight": 10001},
        {"bogus": 1},
    ):
        with pytest.raises(ValidationError):
            CgroupLimits.model_validate(bad)
    with pytest.raises(ValidationError):
        IoLimit(major=-1, minor=0)
    lim = CgroupLimits.model_validate({"io": [{"major": 8, "minor": 0, "wbps": 1048576}]})
    assert lim.io[0].wbps == 1048576 and lim.io[0].rbps is None
