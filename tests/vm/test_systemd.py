"""rexecd under real systemd, in an emulated QEMU guest booting Debian 12 with a pure
cgroup v2 hierarchy (the image from scripts/build-systemd-guest, cached outside git).

The guest runs tests/vm/systemd_guest.sh once at boot: scripts/install from wheels made
here on the host (the guest has no network); the first request on the socket starts
the daemon; a container is created; ``systemctl restart`` leaves it running and the
new daemon re-adopts it; stop then start works; the journal carries CONTAINER_ID, USER
and REQUEST_ID; ``systemd-analyze verify`` passes for both units; uninstall cleans up.
Each of those is one "CHECK" line of the guest's output, asserted below.

Slow by nature (TCG: code runs 12-30x slower): one boot per module, deadlines in the
guest scaled by REXECD_TEST_SLOW (default 20 here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("REXECD_GUEST_CACHE", "/var/cache/rexecd-test/systemd-guest"))
SLOW = float(os.environ.get("REXECD_TEST_SLOW", "20") or "20")
# Boot, install, three daemon starts and a container, at up to 30x slower than here.
GUEST_TIMEOUT_S = int(120 * SLOW)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(GUEST_TIMEOUT_S + 1800)]


@dataclass
class Guest:
    status: int | None
    output: str
    checks: dict[str, str]


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    if os.geteuid() != 0:
        pytest.skip("building the guest image (mmdebstrap) needs root")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4"):
        _need(tool)
    if not (ROOT / "build" / "test-images" / "busybox.tar").exists():
        pytest.skip("build/test-images/busybox.tar missing: run scripts/setup")
    subprocess.run([str(ROOT / "scripts" / "build-systemd-guest"), str(CACHE)], check=True)
    out = tmp_path_factory.mktemp("systemd-guest")
    wheels = out / "wheels"
    shutil.copytree(CACHE / "wheels", wheels)
    # This checkout as a wheel (its native part built here, for the guest's Python 3.11).
    subprocess.run(
        [
            *(str(ROOT / ".venv" / "bin" / "pip"), "wheel", "-q", "--no-deps"),
            *("--no-build-isolation", "-w", str(wheels), str(ROOT)),
        ],
        check=True,
        cwd=ROOT,
    )
    script = out / "guest-test"
    text = (ROOT / "tests" / "vm" / "systemd_guest.sh").read_text()
    script.write_text(text.replace("SLOW=${SLOW:-20}", f"SLOW={int(SLOW)}", 1))
    script.chmod(0o755)
    cmd = [
        *("qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max"),
        *("-smp", "2", "-m", "2G", "-display", "none", "-monitor", "none", "-no-reboot"),
        *("-nic", "none", "-kernel", str(CACHE / "vmlinuz"), "-initrd", str(CACHE / "initrd.img")),
        "-append",
        "root=/dev/vda rw console=ttyS0 quiet systemd.unified_cgroup_hierarchy=1 "
        "cgroup_no_v1=all panic=-1",
        "-drive",
        f"file={CACHE / 'rootfs.img'},format=raw,if=virtio,snapshot=on",
        "-virtfs",
        f"local,path={ROOT},mount_tag=proj,security_model=none,multidevs=remap,readonly=on",
        "-virtfs",
        f"local,path={out},mount_tag=ciout,security_model=none",
        *("-serial", f"file:{out / 'console.log'}"),
    ]
    started = time.monotonic()
    try:
        subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=GUEST_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pass  # reported below: no status file
    print(f"guest ran {time.monotonic() - started:.0f}s")
    log = out / "guest.log"
    output = log.read_text(errors="replace") if log.exists() else ""
    if not output:
        console = out / "console.log"
        output = console.read_text(errors="replace")[-8000:] if console.exists() else ""
    status_file = out / "status"
    status = int(status_file.read_text()) if status_file.exists() else None
    checks = {name: result for result, name in re.findall(r"^CHECK (ok|FAIL) (\S+)", output, re.M)}
    print(output[-12000:])
    return Guest(status, output, checks)


def _ok(guest: Guest, *names: str) -> None:
    assert guest.checks, "the guest ran no check:\n" + guest.output[-6000:]
    bad = {n: guest.checks.get(n, "missing") for n in names if guest.checks.get(n) != "ok"}
    assert not bad, f"{bad}\n" + guest.output[-6000:]


def test_guest_booted_systemd_on_cgroup_v2(guest: Guest) -> None:
    m = re.search(r"^guest: (\S+), systemd (\d+), cgroup2 at ([^,\s]*)", guest.output, re.M)
    assert m, guest.output[-6000:]
    assert m.group(3) == "/sys/fs/cgroup"


def test_install_is_idempotent_and_units_verify(guest: Guest) -> None:
    _ok(guest, "install", "install_again", "version_runs", "config_written", "group_exists")
    _ok(guest, "analyze_verify", "socket_listening", "service_not_started_yet")


def test_first_request_activates_the_socket(guest: Guest) -> None:
    _ok(guest, "first_request_activates", "service_active", "notify_status", "watchdog_set")
    _ok(guest, "group_member_uses_socket", "container_running")


def test_restart_keeps_the_container_and_readopts_it(guest: Guest) -> None:
    _ok(guest, "restart", "restart_active", "restart_container_alive", "restart_same_init")
    _ok(guest, "restart_still_running", "restart_readopted", "status_counts_it")
    _ok(guest, "container_cgroup_outside_unit")


def test_stop_then_start(guest: Guest) -> None:
    _ok(guest, "stop", "stopped", "stop_container_alive", "stop_socket_kept")
    _ok(guest, "start", "start_active", "start_still_running", "exec_works")


def test_tcp_listener_from_a_socket_drop_in(guest: Guest) -> None:
    _ok(guest, "tcp_socket_started", "tcp_activates", "tcp_unix_too", "tcp_both_fds")
    _ok(guest, "tcp_loopback_no_warning")


def test_journal_has_the_structured_fields(guest: Guest) -> None:
    _ok(guest, "journal_container_id", "journal_user", "journal_request_id", "journal_no_token")
    _ok(guest, "container_stopped", "journal_stop_line")


def test_uninstall(guest: Guest) -> None:
    _ok(guest, "uninstall", "uninstall_again", "units_gone")
    assert guest.status == 0, guest.output[-6000:]
