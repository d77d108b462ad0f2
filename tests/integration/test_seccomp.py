"""The seccomp filter, against the real kernel: first its answers in a plain process (the
argument checks, the stacking of its two programs, the ABI check), then from inside
containers, execs and terminals, then per tier through the daemon."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rexecd.runtime import seccomp
from rexecd.runtime.container import Runtime
from tests.integration.daemon import ROOT, Daemon
from tests.integration.daemon_fixtures import seccomp_tiers
from tests.integration.probe import exec_out, image, parse, probe_bin, probe_lower, running
from tests.integration.runtime_helpers import run, runtime
from tests.integration.terminal_client import (
    create_running,
    exec_sh,
    running_daemon,
    terminal,
)
from tests.seccomp_expect import REFUSED_WITH_EPERM

__all__ = ["probe_bin", "probe_lower", "runtime"]  # fixtures used here

# ------------------------------------------------------------------ a plain process

# Installs the given programs (as the spawner's child does) and makes raw syscalls;
# prints {name: 0 or errno name}. Arguments are zeros or bad fds, so a filter that
# wrongly let one through could do nothing harmful either.
PLAIN = r"""
import base64, ctypes, errno, json, os, sys
import prctl
from rexecd import _native as n

programs = [base64.b64decode(p) for p in json.loads(sys.argv[1])]
# sys.argv[2]: syscalls made with an invalid first argument (fd, pointer or command)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
r, w = os.pipe()
prctl.set_no_new_privs(True)
for p in programs:
    n.seccomp_install(p)
out = {}

def call(name, sysname, *args):
    ctypes.set_errno(0)
    # Newer than this libseccomp, so in no rule (same number on x86_64 and aarch64).
    newer = {"lsm_list_modules": 461, "file_setattr": 469}
    nr = newer[sysname] if sysname in newer else n.scmp_resolve(sysname)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
    if ret == 0 and sysname in ("clone", "clone3"):
        os._exit(0)  # a child made by a clone the filter should have refused
    if ret > 0 and sysname in ("clone", "clone3"):
        os.waitpid(ret, 0)
    out[name] = errno.errorcode[ctypes.get_errno()] if ret < 0 else 0

NEWUSER, NEWTIME, FILES, SIGCHLD = 0x10000000, 0x80, 0x400, 17
call("ioctl TIOCSTI", "ioctl", r, 0x5412, 0)
call("ioctl TIOCSTI high bits", "ioctl", r, 0x100005412, 0)
call("ioctl TIOCSTI sign-extended", "ioctl", r, 0xFFFFFFFF00005412, 0)
call("ioctl TIOCLINUX", "ioctl", r, 0x541C, 0)
call("ioctl FS_IOC_SETFLAGS", "ioctl", r, 0x40086602, 0)
call("ioctl FS_IOC_FSSETXATTR high bits", "ioctl", r, 0x7_401C5820, 0)
count = ctypes.c_int(0)
ctypes.set_errno(0)
ret = libc.syscall(ctypes.c_long(n.scmp_resolve("ioctl")), r, ctypes.c_ulong(0x541B),
                   ctypes.byref(count))
out["ioctl FIONREAD"] = 0 if ret == 0 else errno.errorcode[ctypes.get_errno()]
call("clone NEWUSER", "clone", NEWUSER | SIGCHLD, 0, 0, 0, 0)
call("clone NEWUSER high bits", "clone", (1 << 32) | NEWUSER | SIGCHLD, 0, 0, 0, 0)
call("clone3", "clone3", 0, 0)
call("unshare NEWUSER", "unshare", NEWUSER)
call("unshare NEWTIME", "unshare", NEWTIME)
call("unshare FILES", "unshare", FILES)
call("socket AF_VSOCK", "socket", 40, 1, 0)
call("socket AF_VSOCK high bits", "socket", (1 << 32) | 40, 1, 0)
call("personality query", "personality", 0xFFFFFFFF)
call("personality ADDR_NO_RANDOMIZE", "personality", 0x0040000)
for name in json.loads(sys.argv[2]):
    call(name, name, 0xFFFFFFFF, 0, 0, 0, 0)
call("lsm_list_modules", "lsm_list_modules", 0, 0, 0)
call("file_setattr", "file_setattr", 0xFFFFFFFF, 0, 0, 0, 0)  # FS_IOC_FSSETXATTR by path
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
lines = open("/proc/self/status").read().splitlines()
status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
out["Seccomp"] = status["Seccomp"].strip()
out["Seccomp_filters"] = status.get("Seccomp_filters", "?").strip()
print(json.dumps(out))
"""


# kexec_load is left out: with no segments it would unload a loaded kernel, were the
# filter ever to let it through.
PLAIN_REFUSED = [x for x in REFUSED_WITH_EPERM if x != "kexec_load"]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (a filter installed there stays there)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def _plain(programs: list[str]) -> dict[str, object]:
    r = _python(PLAIN, json.dumps(programs), json.dumps(PLAIN_REFUSED))
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_filter_answers_in_a_plain_process() -> None:
    got = _plain(seccomp.SeccompFilters().programs("default"))
    assert got["Seccomp"] == "2" and got["Seccomp_filters"] == "2"
    eperm = [
        "ioctl TIOCSTI",
        "ioctl TIOCSTI high bits",
        "ioctl TIOCSTI sign-extended",
        "ioctl TIOCLINUX",
        "ioctl FS_IOC_SETFLAGS",
        "ioctl FS_IOC_FSSETXATTR high bits",
        "clone NEWUSER",
        "clone NEWUSER high bits",
        "unshare NEWUSER",
        "unshare NEWTIME",
        *PLAIN_REFUSED,
    ]
    assert {k: got[k] for k in eperm} == dict.fromkeys(eperm, "EPERM")
    assert got["clone3"] == "ENOSYS"  # so that libc falls back to clone
    assert got["lsm_list_modules"] == "ENOSYS"  # a syscall no rule names
    assert got["file_setattr"] == "ENOSYS"  # Linux 6.17's way to a file's project id
    assert got["personality ADDR_NO_RANDOMIZE"] == "ENOSYS"
    assert got["socket AF_VSOCK"] == got["socket AF_VSOCK high bits"] == "EAFNOSUPPORT"
    # What programs need still works.
    assert got["ioctl FIONREAD"] == 0 and got["unshare FILES"] == 0
    assert got["personality query"] == 0 and got["fork"] == 7


def test_the_same_calls_unfiltered_reach_the_kernel() -> None:
    """The control for the test above: without the filter the kernel answers otherwise."""
    got = _plain(seccomp.SeccompFilters().programs("unconfined"))
    assert got["Seccomp"] == "0"
    assert got["ioctl TIOCSTI"] == "ENOTTY" and got["ioctl TIOCSTI high bits"] == "ENOTTY"
    assert got["keyctl"] != "EPERM" and got["clone3"] == "EINVAL"  # clone3(NULL, 0)


def test_other_abis_kill_the_process() -> None:
    """A syscall through another ABI (x32 numbers on x86_64) is killed, not judged by
    the native rules."""
    if platform.machine() != "x86_64":
        pytest.skip("x86_64 only")
    code = (
        "import base64, ctypes, json, sys, prctl\n"
        "from rexecd import _native as n\n"
        "prctl.set_no_new_privs(True)\n"
        "for p in json.loads(sys.argv[1]): n.seccomp_install(base64.b64decode(p))\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.syscall(ctypes.c_long(0x40000000 | 39))\n"  # x32 getpid
        "print('survived')\n"
    )
    r = _python(code, json.dumps(seccomp.SeccompFilters().programs("default")))
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stdout, r.stderr)
    assert "survived" not in r.stdout


# ------------------------------------------------------------------ inside containers

REFUSED = {
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "request_key": "EPERM",
    "bpf": "EPERM",
    "io_uring": "EPERM",
    # fs.aio-max-nr is one count for the whole host: one io_setup(65536) from a
    # container left every other tenant (and the host) EAGAIN.
    "io_setup": "ENOSYS",
    "userfaultfd": "EPERM",
    "perf": "EPERM",
    "clone3": "ENOSYS",
    "clone-newuser": "EPERM",
    "unshare-user": "EPERM",
    "unshare-net": "EPERM",
    "setns": "EPERM",
    "fsopen": "EPERM",
    "open_tree": "EPERM",
    "clock_settime": "EPERM",
    "vsock": "EAFNOSUPPORT",
    "setflags": "EPERM",
    "fssetxattr": "EPERM",
    "nr": "ENOSYS",
}
PROBES = [
    *(k for k in REFUSED if k not in ("setflags", "fssetxattr", "nr")),
    "setflags:/tmp/attr",
    "fssetxattr:/tmp/attr",
    "nr:461",  # lsm_list_modules: newer than any rule
]


def test_container_command_exec_and_terminal_are_filtered(
    runtime: Runtime, busybox_layer: Path
) -> None:
    res = run(runtime, image(busybox_layer), "grep -E '^(Seccomp|NoNewPrivs)' /proc/self/status")
    assert "Seccomp:\t2" in res.out and "Seccomp_filters:\t2" in res.out, res.out
    assert "NoNewPrivs:\t1" in res.out
    with running(runtime, image(busybox_layer)) as (cid, pid):
        for tty in (False, True):
            status, out = exec_out(
                runtime,
                cid,
                pid,
                ["grep", "-E", "^(Seccomp|NoNewPrivs):", "/proc/self/status"],
                tty=tty,
            )
            assert status == 0 and "Seccomp:\t2" in out and "NoNewPrivs:\t1" in out, (tty, out)
        # init (rexec-init) carries the filter too.
        status, out = exec_out(runtime, cid, pid, ["grep", "Seccomp:", "/proc/1/status"])
        assert "Seccomp:\t2" in out


def test_refused_from_inside_a_default_container(
    runtime: Runtime, busybox_layer: Path, probe_lower: Path
) -> None:
    res = run(
        runtime,
        image(busybox_layer, probe_lower),
        f'probe {" ".join(PROBES)}; unshare -U true; echo "-U: $?"; unshare -n true; echo "-n: $?"',
    )
    assert parse(res.out) == REFUSED, res.out
    assert res.out.count("Operation not permitted") >= 2, res.out
    assert "-U: 1" in res.out and "-n: 1" in res.out, res.out


def test_unconfined_profile_runs_without_a_filter(
    runtime: Runtime, busybox_layer: Path, probe_lower: Path
) -> None:
    """The control: the probes above measure the filter, not something else."""
    res = run(
        runtime,
        image(busybox_layer, probe_lower),
        "grep Seccomp: /proc/self/status; "
        "probe keyctl clone3 unshare-user io_uring io_setup setflags:/x",
        seccomp="unconfined",
    )
    assert "Seccomp:\t0" in res.out
    got = parse(res.out)
    assert got["keyctl"] == got["clone3"] == got["unshare-user"] == got["io_uring"] == "OK", got
    assert got["io_setup"] == "OK", got
    assert got["setflags"] != "EPERM", got


def test_terminal_ioctls_are_refused(
    runtime: Runtime, busybox_layer: Path, probe_lower: Path
) -> None:
    img = image(busybox_layer, probe_lower)
    for profile, want in (("default", "EPERM"), ("unconfined", None)):
        with running(runtime, img, seccomp=profile) as (cid, pid):
            _status, out = exec_out(
                runtime,
                cid,
                pid,
                ["probe", "tiocsti", "tiocsti-high", "tioclinux"],
                tty=True,
                seccomp=profile,
            )
            got = parse(out)
            if want:
                assert got == dict.fromkeys(("tiocsti", "tiocsti-high", "tioclinux"), want), out
            else:
                # The kernel itself lets a process push input into its own terminal.
                assert got["tiocsti"] == got["tiocsti-high"] == "OK", out


def test_custom_profile_file(runtime: Runtime, busybox_layer: Path, tmp_path: Path) -> None:
    """A profile named by path: the default one less mkdir, which gets EPERM."""
    profile = seccomp.load_profile("default")
    assert profile is not None
    refused = ("mkdir", "mkdirat")
    rules = profile.model_dump(exclude_defaults=True)
    for rule in rules["syscalls"]:
        rule["names"] = [x for x in rule["names"] if x not in refused]
    rules["syscalls"].append({"names": list(refused), "action": "SCMP_ACT_ERRNO", "errnoRet": 1})
    path = tmp_path / "no-mkdir.json"
    path.write_text(json.dumps(rules))
    script = "mkdir /tmp/d; echo rc=$?"
    res = run(runtime, image(busybox_layer), script, seccomp=str(path))
    assert "Operation not permitted" in res.out and "rc=1" in res.out, res.out
    assert run(runtime, image(busybox_layer), script).out == "rc=0\n"


# ------------------------------------------------------------------ per tier, through the daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("seccomp"), seccomp_tiers(pro="unconfined")) as d:
        yield d


async def test_tier_profiles_reach_exec_and_terminal(daemon: Daemon) -> None:
    for tier, want in (("free", "2"), ("pro", "0")):
        token = daemon.token(f"sc-{tier}", tier=tier)
        name = f"sc-{tier}"
        create_running(daemon, token, name)
        out = exec_sh(daemon, token, name, "grep Seccomp: /proc/self/status /proc/1/status")
        assert out.count(f"Seccomp:\t{want}") == 2, (tier, out)
        async with terminal(daemon, token, name, id=f"sc-{tier}") as t:
            assert f"Seccomp:\t{want}" in await t.run("grep Seccomp: /proc/self/status")


def test_a_bad_profile_stops_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": []}]}))
    d = Daemon(tmp_path, seccomp_tiers(guest=str(bad)))
    try:
        with pytest.raises(RuntimeError) as info:
            d.start()
        assert "tiers.guest.seccomp" in str(info.value) and str(bad) in str(info.value)
    finally:
        d.close()
