"""A Runtime on the real kernel and the helpers that run a container to completion,
for the runtime-level isolation, seccomp and CVE regression tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rexecd.errors import ChildSetupError
from rexecd.runtime.cgroups import CgroupLimits, open_driver
from rexecd.runtime.container import ContainerDirs, ImageView, Runtime
from rexecd.runtime.spawner import Spawner
from rexecd.runtime.spec import BindMount, ContainerSpec, UsernsSpec
from rexecd.runtime.userns import IdRanges
from tests.deadlines import scaled
from tests.integration.conftest import Result, make_busybox_layer


class RangedRuntime(Runtime):
    """A Runtime that gives every container a user namespace of its own, its range
    picked from its id (the daemon leases one instead): ``REXECD_TEST_USERNS=1`` runs
    the runtime-level suites this way."""

    def _range(self, cid: str) -> UsernsSpec:
        assert self.userns is not None
        return self.userns.range(int(cid[:8], 16) % self.userns.count)

    def create_dirs(self, dirs: ContainerDirs, userns: UsernsSpec | None = None) -> None:
        super().create_dirs(dirs, userns or self._range(dirs.base.name))

    def build_spec(self, cid: str, *args: Any, **kw: Any) -> ContainerSpec:
        kw.setdefault("userns", self._range(cid))
        return super().build_spec(cid, *args, **kw)


def make_runtime(state: Path, run_dir: Path, cgroup_parent: str, sp: Spawner) -> Runtime:
    if os.environ.get("REXECD_TEST_USERNS") == "1":
        ranges = IdRanges(base=2_000_000, size=65536, count=256)
        return RangedRuntime(state, run_dir, open_driver(cgroup_parent), sp, userns=ranges)
    return Runtime(state, run_dir, open_driver(cgroup_parent), sp)


@pytest.fixture
def runtime(tmp_path: Path, spawner: Spawner, cgroup_parent: str) -> Iterator[Runtime]:
    rt = make_runtime(tmp_path / "state", tmp_path / "run", cgroup_parent, spawner)
    yield rt


def image(layer: Path, user: str = "") -> ImageView:
    return ImageView(
        layers=[layer], env=["PATH=/bin"], entrypoint=None, cmd=["sh"], working_dir="/", user=user
    )


def run(
    rt: Runtime,
    img: ImageView,
    script: str,
    *,
    hostname: str = "box",
    user: str | None = None,
    mounts: list[BindMount] | None = None,
    seccomp: str = "default",
) -> Result:
    """Run ``sh -c script`` to completion under seccomp profile ``seccomp``; return its
    status and combined output."""
    cid = uuid.uuid4().hex * 2
    dirs = rt.dirs(cid)
    rt.create_dirs(dirs)
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        spec = rt.build_spec(
            cid,
            hostname,
            img,
            dirs,
            args=["sh", "-c", script],
            user=user,
            mounts=mounts,
            seccomp=seccomp,
        )
        pid = rt.start(spec, CgroupLimits(), stdio=[devnull, w, w])
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        status = rt.spawner.wait(pid, timeout=scaled(30))
        assert status is not None, "container did not exit"
        return Result(status, b"".join(chunks).decode(errors="replace"))
    finally:
        os.close(r)
        os.close(devnull)
        if w >= 0:
            os.close(w)
        rt.remove(cid)


def symlinked_proc_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    """An image whose /proc is a symlink fails at the proc mount, leaving no cgroup."""
    evil = make_busybox_layer(tmp_path / "evil")
    (evil / "proc").rmdir()
    (evil / "proc").symlink_to("/etc")
    with pytest.raises(ChildSetupError) as info:
        run(runtime, image(evil), "true")
    assert info.value.step == "mount /proc and /sys"
    assert runtime.cgroups is not None and runtime.cgroups.list() == []
