"""Boots one QEMU guest with a pure cgroup v2 kernel (scripts/vm-test) and checks that the
cgroup integration tests (the driver alone, and resource limits through a real daemon)
passed inside it, against the v2 driver.

Slow by nature (software emulation: about 20 s to boot, code 12-30x slower): the guest
is booted once per module and every check below reads its results.
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Both suites in the one guest boot: booting costs more than most of the tests.
DRIVER_SUITE = "tests/integration/test_cgroups_runtime.py"
LIMITS_SUITE = "tests/integration/test_limits.py"
# This host's kernel has no quota support; the guest's has: project quota runs there.
PROJQUOTA_SUITE = "tests/integration/test_storage_projquota.py"
# With user namespaces on (the daemons' default, and REXECD_TEST_USERNS=1 for the
# runtime-level tests): the mapping itself. The terminal suite passes there too (21
# tests, shown once by hand) but adds about 7 minutes to every run; nothing in it
# depends on the cgroup version.
USERNS_SUITES = ("tests/integration/test_userns.py",)
SUITES = (DRIVER_SUITE, LIMITS_SUITE, PROJQUOTA_SUITE, *USERNS_SUITES)
SKIP_STATUS = 77

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]


@dataclass
class GuestRun:
    status: int
    output: str
    outcomes: dict[str, str] = field(default_factory=dict)  # test name -> outcome
    messages: dict[str, str] = field(default_factory=dict)
    modules: dict[str, set[str]] = field(default_factory=dict)  # module -> its test names
    # What each daemon's user namespace probe decided ("user namespaces: on (...)").
    userns: list[str] = field(default_factory=list)


def _parse_junit(path: Path, run: GuestRun) -> None:
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        # junit's classname is the dotted module path, e.g. tests.integration.test_limits.
        module = case.get("classname", "").rsplit(".", 1)[-1]
        assert name not in run.outcomes, f"two guest tests named {name}: keys would clash"
        run.modules.setdefault(module, set()).add(name)
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = kind
                run.messages[name] = node.get("message", "")
        run.outcomes[name] = outcome


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if os.geteuid() != 0:
        pytest.skip("the guest runs as the host user, and the cgroup tests need root")
    out = tmp_path_factory.mktemp("vm")
    env = dict(os.environ, VM_TEST_OUT=str(out), REXECD_TEST_USERNS="1")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "vm-test"), *SUITES, "-v", "-s"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=3000,
    )
    print(proc.stdout[-20000:])
    timings = out / "timings"
    if timings.exists():
        print("guest run:", timings.read_text().strip())
    if proc.returncode == SKIP_STATUS:
        reason = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SKIP:")), "")
        pytest.skip(reason or "QEMU cannot run here")
    run = GuestRun(proc.returncode, proc.stdout)
    junit = out / "junit.xml"
    if junit.exists():
        _parse_junit(junit, run)
    decided = out / "userns.log"
    if decided.exists():
        run.userns = decided.read_text(errors="replace").splitlines()
    return run


def test_guest_booted_a_pure_v2_kernel(guest: GuestRun) -> None:
    m = re.search(r"guest: (\S+), up ([\d.]+)s, (\d+) v1 mounts, cgroup2 at (\S*)", guest.output)
    assert m, "the guest never ran the test command:\n" + guest.output[-5000:]
    assert m.group(3) == "0", "cgroup v1 hierarchies are mounted in the guest"
    assert m.group(4) == "/sys/fs/cgroup"
    print(f"guest kernel {m.group(1)}, command started {m.group(2)} s after boot")
    for line in re.findall(r"^.*measured.*$", guest.output, re.MULTILINE):
        print("guest:", line.split("::")[-1].strip())


def test_cgroup_suite_passed_in_the_guest(guest: GuestRun) -> None:
    assert guest.outcomes, "no junit results from the guest:\n" + guest.output[-5000:]
    bad = {n: o for n, o in guest.outcomes.items() if o in ("failure", "error")}
    assert not bad, f"failed in the guest: {bad}\n" + guest.output[-8000:]
    assert guest.status == 0, guest.output[-5000:]


def test_v2_specific_paths_ran(guest: GuestRun) -> None:
    # Ran, not skipped: these would be skipped against a v1 driver.
    assert guest.outcomes.get("test_delegated_parent_moves_the_daemon_into_a_leaf") == "passed"
    assert guest.outcomes.get("test_io_throttle_holds_the_rate[write]") == "passed"
    assert guest.outcomes.get("test_cpu_quota_holds_and_changes_live") == "passed"
    assert guest.outcomes.get("test_memory_hog_is_oom_killed_and_counted") == "passed"
    # The v1 device whitelist has no v2 counterpart here (it would be a BPF program).
    assert guest.outcomes.get("test_device_access_is_limited") == "skipped"


def test_resource_limits_ran_and_passed_in_the_guest(guest: GuestRun) -> None:
    # Every limit test ran through the daemon against the v2 driver: none skipped
    # (a skip would mean a missing kernel feature, e.g. no loop device for volumes).
    names = guest.modules.get("test_limits", set())
    assert names, "no test_limits results from the guest:\n" + guest.output[-5000:]
    expected = {
        "test_memory_hog_is_oom_killed_and_reported",
        "test_cpu_quota_holds_and_a_live_change_takes_effect",
        "test_fork_bomb_stops_at_pids_max_and_the_daemon_answers",
        "test_disk_bandwidth_is_held_for_writes_and_reads",
        "test_disk_iops_are_held",
    }
    assert expected <= names, f"missing in the guest: {expected - names}"
    outcomes = {n: guest.outcomes[n] for n in names}
    assert all(o == "passed" for o in outcomes.values()), (
        f"{outcomes}\n{ {n: guest.messages.get(n) for n in names if n in guest.messages} }"
    )


def test_project_quota_ran_and_passed_in_the_guest(guest: GuestRun) -> None:
    # The host kernel skips these (no CONFIG_QFMT_V2): the guest is where they run.
    names = guest.modules.get("test_storage_projquota", set())
    assert names, "no test_storage_projquota results from the guest:\n" + guest.output[-5000:]
    outcomes = {n: guest.outcomes[n] for n in names}
    ran = [n for n, o in outcomes.items() if o == "passed"]
    assert len(ran) >= 10, outcomes
    assert all(o in ("passed", "skipped") for o in outcomes.values()), (
        f"{outcomes}\n{ {n: guest.messages.get(n) for n in names if n in guest.messages} }"
    )


def test_daemons_ran_with_user_namespaces_on_in_the_guest(guest: GuestRun) -> None:
    # Debian 12's 6.1 kernel idmaps ext4 (the guest's TMPDIR, where every daemon keeps
    # its state) and takes an attached idmapped mount as an overlay layer: with
    # userns.enabled auto, every daemon of the limit suites ran its containers in user
    # namespaces. A fallback (say the probe failing again) must fail here, not pass
    # the cgroup suites with container root as host root.
    assert guest.userns, "no daemon logged its user namespace decision:\n" + guest.output[-3000:]
    off = [line for line in guest.userns if not line.startswith("user namespaces: on")]
    assert not off, f"daemons fell back in the guest: {sorted(set(off))}"
    print(f"guest: {len(guest.userns)} daemons, all with user namespaces on")
