"""Fixtures for integration tests: a busybox lower dir, a spawner and a runtime that
runs containers and returns their output. Everything made here is removed after."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.registry import Registry, running_registry

BUSYBOX = Path("/bin/busybox")


def make_busybox_layer(dest: Path) -> Path:
    """A minimal root: static busybox with an applet link per command, passwd and group."""
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (scripts/setup installs it)")
    for d in ("bin", "etc", "tmp", "root", "home/user", "proc", "sys", "dev"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for name in applets:
        if name != "busybox":
            (dest / "bin" / name).symlink_to("busybox")
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\ntty:x:5:\n")
    os.chown(dest / "home" / "user", 1000, 1000)
    return dest


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_layer(tmp_path_factory.mktemp("layer") / "root")


@dataclass
class Result:
    status: int
    out: str


@pytest.fixture(scope="module")
def spawner() -> Iterator[object]:
    from rexecd.runtime.spawner import Spawner

    sp = Spawner()
    yield sp
    sp.close()


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    """A unique cgroup parent for this test, removed afterwards on every hierarchy."""
    name = f"rexecd-test-{uuid.uuid4().hex[:8]}"
    yield name
    from rexecd.runtime.cgroups import open_driver

    drv = open_driver(name)
    for child in drv.list():
        drv.open(child).destroy()
    drv.remove_parent()


@pytest.fixture(scope="session", autouse=True)
def _sweep_dead_test_daemons() -> None:
    """Before the first test: remove what test daemons of killed runs left behind (their
    daemon, bridge, nft tables, veths, cgroups, mounts, loop devices and run dir). Only
    daemons whose owning process is dead are touched; see ``daemon.sweep_dead_owners``."""
    if os.geteuid() != 0:
        return
    from tests.integration.daemon import sweep_dead_owners

    swept = sweep_dead_owners()
    if swept:
        print(f"\nswept {len(swept)} test daemon(s) of dead runs: {', '.join(swept)}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain registry on loopback, one per test module (the pull and Debian image
    modules define their own: per test, and holding the Debian image)."""
    with running_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r
