"""`rexecd run` and `rexecd image`, as a user runs them: the issue's must-show command."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rexecd.runtime.cgroups import open_driver

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "build" / "test-images"


def rexecd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rexecd.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=check,
        timeout=120,
    )


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (IMAGES / "busybox.tar").exists():
        pytest.fail(f"{IMAGES}/busybox.tar missing: ./scripts/setup builds it")
    st = tmp_path_factory.mktemp("state")
    for name in ("busybox.tar", "layered.tar"):
        rexecd("image", "import", "--state-dir", str(st), str(IMAGES / name))
    return st


def run(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run_dir = Path("/run") / f"rexecd-cli-{uuid.uuid4().hex[:8]}"
    parent = f"rexecd-cli-{uuid.uuid4().hex[:6]}"
    try:
        return rexecd(
            "run",
            "--state-dir",
            str(state),
            "--run-dir",
            str(run_dir),
            "--cgroup-parent",
            parent,
            *args,
            check=False,
        )
    finally:
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
        # The container's own cgroup went with it; the parent is the test's to remove.
        drv = open_driver(parent)
        assert drv.list() == [], f"rexecd run left cgroups: {drv.list()}"
        drv.remove_parent()


def test_image_ls_lists_imported(state: Path) -> None:
    out = rexecd("image", "ls", "--state-dir", str(state)).stdout
    assert "busybox:latest" in out and "layered:latest" in out


def test_must_show_pid_hostname_proc_and_links(state: Path) -> None:
    r = run(
        state,
        "--rm",
        "--hostname",
        "demo",
        "busybox:latest",
        "--",
        "sh",
        "-c",
        "echo $$; hostname; head -c 10 /proc/1/cmdline; echo; ls /proc; ip link",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "2"  # pid 1 is rexec-init, the shell is 2
    assert lines[1] == "demo"
    assert lines[2] == "rexec-init"
    pids = [int(x) for x in lines[3:] if x.isdigit()]
    assert max(pids) < 10, pids  # nothing of the host
    links = [line for line in lines if ": <" in line]
    assert len(links) == 1 and links[0].startswith("1: lo:")


def test_exit_status_and_stdio_pass_through(state: Path) -> None:
    r = run(state, "--rm", "busybox:latest", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout == "out\n" and "err\n" in r.stderr


def test_image_config_is_honoured(state: Path) -> None:
    r = run(
        state,
        "--rm",
        "-e",
        "FOO=bar",
        "-w",
        "/tmp",
        "-u",
        "user",
        "busybox:latest",
        "--",
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; echo $PATH",
    )
    assert r.returncode == 0, r.stderr
    foo, pwd, uid, path = r.stdout.split()
    assert (foo, pwd, uid) == ("bar", "/tmp", "1000")
    assert "/bin" in path  # the image's Env


def test_layered_image_whiteouts_apply(state: Path) -> None:
    """Layer 3 of layered:latest deletes /bin/vi, /etc/deleteme and /var/cache, replaces
    /etc/replaceme, makes /opt/old opaque and hardlinks /srv/data2 (scripts/build-test-image)."""
    r = run(
        state,
        "--rm",
        "layered:latest",
        "--",
        "sh",
        "-c",
        "ls /bin/vi /etc/deleteme /var/cache 2>&1 | wc -l; echo; ls /bin/vi 2>/dev/null;"
        "cat /etc/replaceme; ls /opt/old; stat -c %h /srv/data2; ls /srv",
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[0] == "3"  # three "No such file" lines
    assert "new" in out and "old" not in out
    assert "new.txt" in out and "a.txt" not in out and "b.txt" not in out
    assert "2" in out  # data2 and its hardlink share an inode
    assert {"data", "data2", "data2-link"} <= set(out)


def test_unknown_image_is_a_clear_error(state: Path) -> None:
    r = run(state, "--rm", "nope:latest", "--", "true")
    assert r.returncode == 125
    assert "nope" in r.stderr and "Traceback" not in r.stderr


def test_rm_leaves_nothing(state: Path) -> None:
    before = set((state / "containers").glob("*")) if (state / "containers").exists() else set()
    r = run(state, "--rm", "busybox:latest", "--", "true")
    assert r.returncode == 0
    after = set((state / "containers").glob("*")) if (state / "containers").exists() else set()
    assert after == before
    # The overlay lived in the container's own mount namespace: none on the host.
    with open("/proc/self/mounts") as f:
        assert not [line for line in f if str(state) in line]
