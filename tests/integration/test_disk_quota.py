"""Disk quota and persistent storage through a real daemon: ENOSPC at disk_mb, data that
survives stop/start and a daemon crash, /home/user kept across delete, nothing leaked."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import TEST_IMAGES, Daemon, api, wait_status

MiB = 1024 * 1024


def loops_under(path: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if str(path) in line]


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if str(path) in line.split()[1]]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="rexecd-disk-", dir="/var/tmp"))
    d = Daemon(base)
    try:
        d.import_image(TEST_IMAGES / "busybox.tar")
        d.start()
        yield d
    finally:
        d.close()
        assert not loops_under(base), loops_under(base)
        assert not mounts_under(base) and not mounts_under(d.run)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def token(daemon: Daemon, request: pytest.FixtureRequest) -> str:
    return daemon.token(f"u{abs(hash(request.node.name)) % 10**8}", tier="pro")


def sh(d: Daemon, tok: str, name: str, cmd: str) -> dict[str, object]:
    code, body, _ = api(
        d, "POST", f"/api/containers/{name}/exec", tok, {"command": cmd, "timeout_seconds": 120}
    )
    assert code == 200, body
    return body


def create(d: Daemon, tok: str, name: str, disk_mb: int = 32, **extra: object) -> dict[str, object]:
    code, body, _ = api(
        d,
        "POST",
        "/api/containers",
        tok,
        {"image": "busybox", "name": name, "disk_mb": disk_mb, **extra},
    )
    assert code == 202, body
    return wait_status(d, tok, name, "running")


def test_writing_past_disk_mb_fails_with_enospc(daemon: Daemon, token: str) -> None:
    create(daemon, token, "full", disk_mb=32)
    before = os.statvfs(daemon.state)
    r = sh(
        daemon,
        token,
        "full",
        "dd if=/dev/zero of=/home/user/big bs=1M count=100; echo rc=$?; "
        "dd if=/dev/zero of=/big2 bs=1M count=10; echo rc2=$?",
    )
    out = str(r["output"])
    # ENOSPC from a full loop volume, EDQUOT from project quota.
    assert "No space left on device" in out or "Disk quota exceeded" in out
    assert "rc=0" not in out and "rc2=0" not in out
    after = os.statvfs(daemon.state)
    host_used = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert host_used <= 32 * MiB, host_used
    _, stats, _ = api(daemon, "GET", "/api/containers/full/stats", token)
    assert stats["disk_limit"] == 32 * MiB
    assert 20 * MiB < stats["disk_usage"] <= 32 * MiB
    # The daemon and other containers are unaffected.
    create(daemon, token, "neighbour", disk_mb=16)
    assert (
        sh(daemon, token, "neighbour", "echo ok > /home/user/f && cat /home/user/f")["stdout"]
        == "ok\n"
    )
    for n in ("full", "neighbour"):
        assert api(daemon, "DELETE", f"/api/containers/{n}?volumes=true", token)[0] == 200


def test_data_survives_stop_start_and_a_daemon_crash(daemon: Daemon, token: str) -> None:
    create(daemon, token, "keep")
    sh(daemon, token, "keep", "echo root > /rootfile; echo home > /home/user/homefile; sync")
    assert api(daemon, "POST", "/api/containers/keep/stop", token)[0] == 200
    assert api(daemon, "POST", "/api/containers/keep/start", token)[0] == 200
    assert (
        sh(daemon, token, "keep", "cat /rootfile /home/user/homefile")["stdout"] == "root\nhome\n"
    )
    sh(daemon, token, "keep", "echo again > /home/user/second; sync")
    daemon.restart(kill=True)
    c = wait_status(daemon, token, "keep", "running")
    assert c["status"] == "running"
    assert sh(daemon, token, "keep", "cat /rootfile /home/user/second")["stdout"] == "root\nagain\n"
    assert api(daemon, "DELETE", "/api/containers/keep?volumes=true", token)[0] == 200


def test_recreate_with_the_same_name_sees_the_old_home(daemon: Daemon, token: str) -> None:
    create(daemon, token, "again")
    sh(daemon, token, "again", "echo mine > /home/user/old; echo gone > /rootfile")
    assert api(daemon, "DELETE", "/api/containers/again", token)[0] == 200
    create(daemon, token, "again")
    r = sh(daemon, token, "again", "cat /home/user/old; ls /rootfile")
    assert r["stdout"] == "mine\n"
    assert "No such file" in str(r["stderr"])  # the root is fresh
    assert api(daemon, "DELETE", "/api/containers/again?volumes=true", token)[0] == 200
    create(daemon, token, "again")
    assert "No such file" in str(sh(daemon, token, "again", "cat /home/user/old")["stderr"])
    assert api(daemon, "DELETE", "/api/containers/again?volumes=true", token)[0] == 200


def test_disk_grows_through_settings_and_never_shrinks(daemon: Daemon, token: str) -> None:
    create(daemon, token, "grow", disk_mb=32)
    code, body, _ = api(daemon, "PATCH", "/api/containers/grow/settings", token, {"disk_mb": 16})
    assert code == 400 and "only grow" in body["error"]
    code, body, _ = api(daemon, "PATCH", "/api/containers/grow/settings", token, {"disk_mb": 64})
    assert code == 200 and body["container"]["resources"]["disk_mb"] == 64
    # Online where the kernel lets us, otherwise at the next start: after a restart it is.
    api(daemon, "POST", "/api/containers/grow/restart", token)
    wait_status(daemon, token, "grow", "running")
    r = sh(daemon, token, "grow", "dd if=/dev/zero of=/home/user/f bs=1M count=45 && echo wrote")
    assert "wrote" in str(r["stdout"]), r
    assert api(daemon, "DELETE", "/api/containers/grow?volumes=true", token)[0] == 200


def test_no_loop_device_or_mount_leaks_across_100_cycles(daemon: Daemon, token: str) -> None:
    base_loops = len(loops_under(daemon.base))
    for i in range(100):
        code, body, _ = api(
            daemon,
            "POST",
            "/api/containers",
            token,
            {"image": "busybox", "name": f"cyc{i % 3}", "disk_mb": 16, "network_mode": "none"},
        )
        assert code == 202, body
        wait_status(daemon, token, f"cyc{i % 3}", "running")
        assert api(daemon, "DELETE", f"/api/containers/cyc{i % 3}?volumes=true", token)[0] == 200
    assert len(loops_under(daemon.base)) == base_loops == 0
    assert not mounts_under(daemon.run / "volumes")
    images = list((daemon.state / "volumes").rglob("*.img"))
    assert not [p for p in images if p.stem.startswith("cyc")]
