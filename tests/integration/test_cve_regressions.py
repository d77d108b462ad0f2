"""One regression test per container-runtime CVE class, named after the CVE: each builds
the attack against rexecd the way it was made against runc (or another runtime) and
asserts that it gets nowhere. The defences are described in the README (process
model, images, seccomp); tests of their parts live beside the code's other tests."""

from __future__ import annotations

import itertools
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from rexecd.errors import ChildSetupError
from rexecd.runtime.container import Runtime
from rexecd.runtime.spec import BindMount, ProcessSpec
from tests.deadlines import scaled
from tests.integration.conftest import make_busybox_layer
from tests.integration.daemon_fixtures import ApiClient
from tests.integration.files_fixtures import F, box, daemon, upload
from tests.integration.probe import (
    build_interp,
    elf_interpreter,
    exec_out,
    image,
    parse,
    probe_bin,
    probe_lower,
    running,
)
from tests.integration.runtime_helpers import run, runtime, symlinked_proc_is_refused
from tests.integration.unpack_cases import CASES, Case, check_layer, sentinel

__all__ = ["box", "daemon", "probe_bin", "probe_lower", "runtime", "sentinel"]  # fixtures used here


# ------------------------------------------------------------------ CVE-2019-5736


def test_cve_2019_5736_proc_self_exe_overwrite(
    runtime: Runtime, busybox_layer: Path, probe_lower: Path, tmp_path: Path
) -> None:
    """runc: a container program that is /proc/self/exe made runc's exec re-run the
    host's runc binary inside the container, which the container then rewrote through
    /proc/PID/exe. Here the process entering a container is the host's Python; were it
    to exec the container's program itself, /proc/self/exe would be that interpreter.

    The image carries a program that is a link to /proc/self/exe, a ``#!/proc/self/exe``
    script, and, where the host's Python looks for its ELF loader, a stand-in loader
    that reports what the kernel was running: if the host interpreter were ever exec'd
    in the container, it would say so. Init itself must not be writable either."""
    loader = elf_interpreter(Path(sys.executable).resolve())
    if loader is None:
        pytest.skip(f"{sys.executable} is static: it needs no loader the test could stand in for")
    evil = tmp_path / "evil"
    (evil / "bin").mkdir(parents=True)
    (evil / "bin" / "self").symlink_to("/proc/self/exe")
    (evil / "bin" / "script").write_text("#!/proc/self/exe /bin/echo\n")
    (evil / "bin" / "script").chmod(0o755)
    stand_in = evil / loader.lstrip("/")
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    build_interp(stand_in.parent)
    (stand_in.parent / "interp").rename(stand_in)
    img = image(busybox_layer, probe_lower, evil)
    with running(runtime, img) as (cid, pid):
        for args in (["/bin/self", "/bin/echo", "reached"], ["/bin/script", "reached"]):
            status, out = exec_out(runtime, cid, pid, args)
            assert "interp exe=" not in out, f"the host's interpreter ran in the container: {out}"
            assert status == 0 and "reached" in out, (args, out)
        # What runs is rexec-init, from its sealed memfd; neither it nor init is writable.
        # rexec-init makes itself non-dumpable, so a process without CAP_SYS_PTRACE may
        # not even read where its exe link points: refused, or the memfd, never a path.
        status, out = exec_out(
            runtime, cid, pid, ["/bin/self", "/bin/sh", "-c", "readlink /proc/$PPID/exe"]
        )
        assert out.startswith("/memfd:rexec-init") or (status != 0 and out == ""), out
        status, out = exec_out(runtime, cid, pid, ["probe", "exe:1", "exe:self"])
        assert out.count("exe=") == 2 and "exe=OK" not in out, out
        status, out = exec_out(runtime, cid, pid, ["sh", "-c", "echo x > /proc/1/exe; echo rc=$?"])
        assert "rc=0" not in out


# ------------------------------------------------------------------ CVE-2024-21626


def test_cve_2024_21626_leaked_fds_and_working_directory(
    runtime: Runtime, busybox_layer: Path, tmp_path: Path
) -> None:
    """runc: a host directory fd leaked into the container's set-up, and a working
    directory of /proc/self/fd/N put the container's process in the host's tree.

    Here the test leaks one on purpose: the exec's stdin is a host directory. A working
    directory through a /proc magic link is refused, and no process inside holds a
    descriptor the container was not given."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "host-marker").write_text("host\n")
    with running(runtime, image(busybox_layer)) as (cid, pid):
        leaked = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY)
        r, w = os.pipe()
        try:
            for cwd in ("/proc/self/fd/0", "/proc/1/root/proc/self/fd/0"):
                proc = ProcessSpec(args=["ls", "-a"], env=["PATH=/bin"], cwd=cwd)
                try:
                    child, _ = runtime.exec(cid, pid, proc, [leaked, w, w])
                except ChildSetupError as exc:
                    assert exc.step == "chdir", exc
                    continue
                runtime.spawner.wait(child.pid, timeout=scaled(10))
                os.set_blocking(r, False)
                try:
                    listing = os.read(r, 65536).decode()
                except BlockingIOError:
                    listing = ""
                assert "host-marker" not in listing, f"cwd {cwd} reached the host: {listing}"
        finally:
            os.close(leaked)
            os.close(r)
            os.close(w)
        # Nothing but stdio in init, in an exec'd process and in what it starts.
        for tty in (False, True):
            _status, out = exec_out(
                runtime,
                cid,
                pid,
                ["sh", "-c", "sleep 30 & ls /proc/1/fd; echo ---; ls /proc/$!/fd; kill $!"],
                tty=tty,
            )
            init_fds, bg_fds = out.replace("\r", "").split("---")
            assert set(init_fds.split()) == {"0", "1", "2"}, out
            assert set(bg_fds.split()) == {"0", "1", "2"}, out


# ------------------------------------------------------------------ CVE-2019-16884


def test_cve_2019_16884_fake_proc_in_image(runtime: Runtime, tmp_path: Path) -> None:
    """runc: an image (or volume) supplying its own /proc redirected what the runtime
    wrote there and hid the masks. Fake files in the image's /proc are covered by the
    container's procfs and its masks; a /proc that is a symlink is refused."""
    fake = make_busybox_layer(tmp_path / "fake")
    (fake / "proc" / "self").mkdir()
    (fake / "proc" / "self" / "status").write_text("Seccomp:\t0\nFAKE\n")
    (fake / "proc" / "kcore").write_text("FAKE kcore\n")
    (fake / "proc" / "sys" / "kernel").mkdir(parents=True)
    (fake / "proc" / "sys" / "kernel" / "core_pattern").write_text("FAKE\n")
    res = run(
        runtime,
        image(fake),
        "cat /proc/kcore /proc/self/status /proc/sys/kernel/core_pattern; "
        "echo x > /proc/sys/kernel/core_pattern; echo rc=$?; "
        'awk \'$5 == "/proc" {print "mount", $9}\' /proc/self/mountinfo',
    )
    assert "FAKE" not in res.out, res.out
    assert "Seccomp:\t2" in res.out and "mount proc" in res.out, res.out
    assert "rc=0" not in res.out
    # /proc as a symlink: refused at the proc mount, nothing left behind.
    symlinked_proc_is_refused(runtime, tmp_path / "symlinked")


# ------------------------------------------------------------------ CVE-2021-30465


def test_cve_2021_30465_mount_target_symlink_swap(
    runtime: Runtime, busybox_layer: Path, tmp_path: Path
) -> None:
    """runc: a volume's mount target swapped for a symlink out of the root made the
    mount land on the host's side. A container's writable layer persists, so a
    container can leave such a symlink where its volume is mounted at its next start.
    The mount must land inside its root (where the link leads there), or the start is
    refused (a dangling link); the host path is never touched."""
    host_target = tmp_path / "host-target"
    host_target.mkdir()
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data").write_text("volume\n")
    img = image(busybox_layer)
    mounts = [BindMount(source=str(vol), target="/home/user")]
    up = "/.." * 12
    for made_inside in (True, False):
        cid = secrets.token_hex(32)
        dirs = runtime.dirs(cid)
        try:
            with running(runtime, img, dirs=dirs) as (c, p):
                mk = f"mkdir -p {host_target} && " if made_inside else ""
                link = f"rmdir /home/user && {mk}ln -s {up}{host_target} /home/user && echo ok"
                _status, out = exec_out(runtime, c, p, ["sh", "-c", link])
                assert out.strip() == "ok", out
            if not made_inside:
                with (
                    pytest.raises(ChildSetupError) as info,
                    running(runtime, img, dirs=dirs, mounts=mounts),
                ):
                    pass
                assert info.value.step == "bind mounts"
                continue
            with running(runtime, img, dirs=dirs, mounts=mounts) as (c, p):
                _status, out = exec_out(runtime, c, p, ["cat", "/home/user/data"])
                assert out == "volume\n", out
                _status, out = exec_out(runtime, c, p, ["ls", str(host_target)])
                assert out.split() == ["data"], out
        finally:
            runtime.remove(cid)
        assert os.listdir(host_target) == []


# ------------------------------------------------------------------ CVE-2025-31133


def test_cve_2025_31133_dev_null_symlink_in_image(runtime: Runtime, tmp_path: Path) -> None:
    """runc: masking bind-mounted the container's /dev/null over masked paths; an image
    whose /dev/null was a symlink to a proc file turned each mask into a writable alias
    of that file. The masks here are the null device of the container's own /dev."""
    evil = make_busybox_layer(tmp_path / "evil")
    (evil / "dev" / "null").symlink_to("/proc/sys/kernel/hostname")
    (evil / "dev" / "zero").write_text("FAKE\n")
    masked = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list") if os.path.exists(p)]
    assert masked, "the host shows none of the masked files"
    script = (
        "; ".join(f"echo {p}=$(wc -c < {p}); echo evil > {p}" for p in masked)
        + "; stat -c %F,%t,%T /dev/null; head -c 4 /dev/zero | od -An -tx1; hostname"
    )
    try:
        res = run(runtime, image(evil), script, hostname="box")
    except ChildSetupError as exc:
        # The second wall: masking refuses a /dev/null that is not the null device.
        assert exc.step == "mask paths", exc
        return
    for p in masked:
        assert f"{p}=0" in res.out, res.out
    # Written through a mask, "evil" would have become the hostname.
    assert "FAKE" not in res.out and "evil" not in res.out
    assert "character special file,1,3" in res.out, res.out
    assert " 00 00 00 00" in res.out and res.out.strip().endswith("box"), res.out


# ------------------------------------------------------------------ CVE-2018-15664


SWAPS = 20000  # bounded: the loop ends by itself even if the test dies


async def test_cve_2018_15664_files_api_symlink_race(
    box: tuple[ApiClient, str], tmp_path: Path
) -> None:
    """docker cp: a symlink swapped in while the daemon resolved a path in the container
    made it read or write the host. Here a container swaps a file and a directory for
    links to host paths as fast as it can while files API requests go through them."""
    canary = Path("/tmp") / f"rexecd-canary-{secrets.token_hex(4)}"
    canary.write_text("host canary\n")
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "host-marker").write_text("host\n")
    c, name = box
    try:
        swap = (
            f"i=0; while [ $i -lt {SWAPS} ]; do "
            "echo inside > /tmp/f; mv -f /tmp/f /tmp/race; "
            f"ln -s {canary} /tmp/l; mv -f /tmp/l /tmp/race; "
            "mkdir -p /tmp/d; rm -rf /tmp/dir; mv /tmp/d /tmp/dir; "
            f"ln -s {host_dir} /tmp/dl; rm -rf /tmp/dir; mv /tmp/dl /tmp/dir; "
            "i=$((i+1)); done"
        )
        await c.sh(name, f"sh -c '{swap}' </dev/null >/dev/null 2>&1 & echo $! > /tmp/swapper")
        # At least 300 rounds, and on until both of the swapper's states were met: on
        # a loaded host the swapper may spend whole rounds in one of them.
        deadline = time.monotonic() + scaled(60)
        seen = {"inside": 0, "uploads": 0}
        for i in itertools.count():
            if time.monotonic() > deadline or (i >= 300 and all(seen.values())):
                break
            r = await c.get(F.format(name), params={"path": "/tmp/race"})
            assert b"host canary" not in r.raw, f"download {i} read the host's file"
            if r.status == 200:
                seen["inside"] += 1
            r = await upload(c, name, "/tmp/dir", b"pwned\n", f"up-{i}")
            seen["uploads"] += r.status == 200
            assert os.listdir(host_dir) == ["host-marker"], f"upload {i} wrote to the host"
            r = await c.get(F.format(name) + "/list", params={"path": "/tmp/dir"})
            listed = [e["name"] for e in r.body["files"]] if r.status == 200 else []
            assert "host-marker" not in listed, f"listing {i} showed the host's directory"
        await c.sh(name, "kill $(cat /tmp/swapper) 2>/dev/null; true")
        # The race was run: some requests met the file, some went through the dir.
        assert seen["inside"] > 0 and seen["uploads"] > 0, seen
        assert canary.read_text() == "host canary\n"
    finally:
        canary.unlink()


# ------------------------------------------------------------------ CVE-2021-29136

TRAVERSAL = [c for c in CASES if c.id.startswith(("dotdot", "symlink-")) and "loop" not in c.id]


@pytest.mark.parametrize("case", TRAVERSAL, ids=[c.id for c in TRAVERSAL])
def test_cve_2021_29136_layer_path_traversal(tmp_path: Path, sentinel: Path, case: Case) -> None:
    """umoci (and others): a layer member named with ``..`` or written through a symlink
    an earlier member planted landed outside the layer. Each such layer is refused
    naming the member, or unpacked with nothing outside changed (the checks of
    test_unpack_malicious, run here for the traversal cases)."""
    check_layer(tmp_path, sentinel, case)


# ------------------------------------------------------------------ TIOCSTI


def test_tiocsti_injection_into_the_terminal_is_refused(
    runtime: Runtime, busybox_layer: Path, probe_lower: Path
) -> None:
    """A process pushing characters into its terminal's input queue (TIOCSTI) makes
    whoever reads the terminal next run them: a shell, after the process exits."""
    with running(runtime, image(busybox_layer, probe_lower)) as (cid, pid):
        script = 'probe "$1"; read -t 1 line; echo "got=[$line]"'
        _status, out = exec_out(
            runtime, cid, pid, ["sh", "-c", script, "sh", "inject:echo PWN''ED\n"], tty=True
        )
    got = parse(out)
    assert got["inject"] == "EPERM", out
    assert "got=[]" in out and "PWNED" not in out and "PWN''ED" not in out, out
