"""Integration: with lxcfs running, a container's /proc shows its own limits: ``free -m``
in a 512 MB container says 512. lxcfs runs here at a mount point of the test's own
(never the host's /var/lib/lxcfs), and is unmounted afterwards."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deadlines import scaled

from .daemon import ROOT, Daemon, api, wait_status
from .daemon_fixtures import running_daemon, unique
from .terminal_client import exec_sh


@pytest.fixture(scope="module")
def lxcfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    binary = shutil.which("lxcfs")
    if binary is None:
        pytest.skip("lxcfs is not installed (./scripts/setup installs the Debian package)")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse: lxcfs cannot run here")
    mnt = tmp_path_factory.mktemp("lxcfs")
    # Its own pid file: the host's lxcfs (if any) keeps /run/lxcfs.pid.
    pidfile = tmp_path_factory.mktemp("lxcfs-run") / "lxcfs.pid"
    proc = subprocess.Popen(
        [binary, "-p", str(pidfile), str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + scaled(15)
        while not (mnt / "proc" / "meminfo").exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.skip(f"lxcfs could not run here: {err.strip()[-300:]}")
            if time.monotonic() > deadline:
                pytest.fail("lxcfs did not come up")
            time.sleep(0.05)
        yield mnt
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # lxcfs unmounts on SIGTERM; a lazy unmount covers a kill.
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, lxcfs_dir: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory, {"lxcfs": {"dir": str(lxcfs_dir)}}) as d:
        yield d


def _box(d: Daemon, token: str, memory_mb: int) -> str:
    name = unique("mem")
    body = {"image": "busybox", "name": name, "memory_mb": memory_mb}
    code, reply, _ = api(d, "POST", "/api/containers", token, body)
    assert code == 202, reply
    wait_status(d, token, name, "running")
    return name


def _procps_free(dest: Path) -> Path:
    """The host's procps ``free`` with its shared libraries and loader, in one directory:
    busybox's own free asks sysinfo(2), which lxcfs cannot change; procps reads
    /proc/meminfo, as Debian and Ubuntu images do."""
    free = shutil.which("free")
    if free is None:
        pytest.skip("procps free is not installed on the host")
    out = subprocess.run(["ldd", free], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"(/\S+\.so[.\d]*)", out)
    dest.mkdir()
    for path in [free, *libs]:
        shutil.copy(path, dest / Path(path).name)
    return dest


def test_free_in_a_512mb_container_shows_512(daemon: Daemon, tmp_path: Path) -> None:
    token = daemon.token(unique("lx"), tier="pro")
    name = _box(daemon, token, 512)
    meminfo = exec_sh(daemon, token, name, "head -1 /proc/meminfo")
    assert meminfo.split()[1] == str(512 * 1024), meminfo

    tools = _procps_free(tmp_path / "procps")
    env = {"REXEC_HOST": daemon.url, "REXEC_TOKEN": token}
    r = subprocess.run(
        [sys.executable, "-m", "rexecd.client.cli", "cp", str(tools), f"{name}:/tmp/procps"],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    loader = next(p.name for p in tools.iterdir() if p.name.startswith("ld-linux"))
    out = exec_sh(
        daemon,
        token,
        name,
        f"/tmp/procps/{loader} --library-path /tmp/procps /tmp/procps/free -m",
    )
    mem = next(line for line in out.splitlines() if line.startswith("Mem:"))
    assert mem.split()[1] == "512", out


def test_without_lxcfs_the_host_totals_and_a_log_line(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    missing = tmp_path_factory.mktemp("no-lxcfs")
    with running_daemon(tmp_path_factory, {"lxcfs": {"dir": str(missing)}}) as d:
        token = d.token(unique("lx"), tier="pro")
        name = _box(d, token, 512)
        total_kib = int(exec_sh(d, token, name, "head -1 /proc/meminfo").split()[1])
        with open("/proc/meminfo") as f:
            host_kib = int(f.readline().split()[1])
        assert total_kib == host_kib
        assert f"lxcfs is not mounted at {missing}" in d.logs()
