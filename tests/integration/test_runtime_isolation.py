"""Each isolation point of a container, checked from inside a real one."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from rexecd.errors import ChildSetupError
from rexecd.runtime.capabilities import DEFAULT_CAPS
from rexecd.runtime.cgroups import CgroupLimits
from rexecd.runtime.container import Runtime
from rexecd.runtime.rootfs import DEVPTS_MAX
from rexecd.runtime.spawner import Spawner
from rexecd.runtime.spec import BindMount, ProcessSpec
from tests.integration.conftest import Result, make_busybox_layer
from tests.integration.probe import image as probe_image
from tests.integration.probe import parse, probe_bin, probe_lower
from tests.integration.runtime_helpers import (
    image,
    make_runtime,
    run,
    runtime,
    symlinked_proc_is_refused,
)

__all__ = ["probe_bin", "probe_lower", "runtime"]  # fixtures used here


def test_pid_namespace_shows_no_host_process(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(runtime, image(busybox_layer), "echo $$; ls /proc")
    lines = res.out.split()
    assert res.status == 0
    assert lines[0] == "2"  # pid 1 is rexec-init
    pids = sorted(int(x) for x in lines[1:] if x.isdigit())
    assert pids[:2] == [1, 2] and max(pids) < 10, pids


def test_hostname_and_uts(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(runtime, image(busybox_layer), "hostname", hostname="my-box")
    assert res.out.strip() == "my-box"
    assert os.uname().nodename != "my-box"


def test_network_namespace_has_only_loopback(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(runtime, image(busybox_layer), "ip -o link")
    links = [line.split(":")[1].strip() for line in res.out.splitlines() if line.strip()]
    assert links == ["lo"]
    assert "UP" in res.out


def test_mount_is_refused(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(runtime, image(busybox_layer), "mount -t tmpfs none /tmp && echo MOUNTED; echo rc=$?")
    assert "MOUNTED" not in res.out
    assert "rc=" in res.out and "rc=0" not in res.out


def test_module_loading_is_refused(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(
        runtime,
        image(busybox_layer),
        "echo junk > /tmp/x.ko; insmod /tmp/x.ko; echo rc=$?; grep CapBnd /proc/self/status",
    )
    assert "rc=0" not in res.out
    bounding = int(res.out.split("CapBnd:")[1].split()[0], 16)
    import prctl

    assert not bounding & (1 << prctl.CAP_SYS_MODULE)
    # The seccomp filter answers EPERM before the kernel looks (a kernel without
    # module support would otherwise say ENOSYS); the missing capability is the
    # second wall.
    assert "not permitted" in res.out.lower()


def test_proc_sys_is_read_only(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(
        runtime,
        image(busybox_layer),
        "echo evil > /proc/sys/kernel/hostname; echo rc=$?; echo c > /proc/sysrq-trigger; "
        "echo rc2=$?; hostname",
    )
    assert "Read-only file system" in res.out
    assert "rc=0" not in res.out and "rc2=0" not in res.out
    assert res.out.strip().endswith("box")


def test_masked_proc_paths_read_empty(runtime: Runtime, busybox_layer: Path) -> None:
    masked = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list") if os.path.exists(p)]
    assert masked, "the host shows none of the masked files"
    script = "; ".join(f"echo {p}=$(cat {p} 2>/dev/null | wc -c)" for p in masked)
    res = run(runtime, image(busybox_layer), script)
    for p in masked:
        assert f"{p}=0" in res.out, res.out
    mounts = run(runtime, image(busybox_layer), "cat /proc/self/mountinfo").out
    assert " /sys/firmware " in mounts


def test_sys_is_read_only(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(
        runtime,
        image(busybox_layer),
        "grep ' /sys ' /proc/mounts; echo 1 > /sys/kernel/uevent_helper; echo rc=$?",
    )
    assert re.search(r"sysfs /sys sysfs ro,", res.out), res.out
    assert "rc=0" not in res.out


def test_dev_has_only_safe_nodes_and_own_devpts(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(runtime, image(busybox_layer), "ls /dev; echo ---; ls /dev/pts")
    dev, pts = res.out.split("---")
    assert set(dev.split()) == {
        "full",
        "null",
        "random",
        "tty",
        "urandom",
        "zero",
        "ptmx",
        "fd",
        "stdin",
        "stdout",
        "stderr",
        "pts",
        "shm",
        "mqueue",
    }
    assert pts.split() == ["ptmx"]


def test_devpts_hands_out_at_most_its_max(
    runtime: Runtime, busybox_layer: Path, probe_lower: Path
) -> None:
    """Container devpts instances share one host-wide pool (kernel.pty.max less
    kernel.pty.reserve, 3072 by default): one container holding them all would leave
    every other tenant's terminals without a PTY."""
    res = run(runtime, probe_image(busybox_layer, probe_lower), f"probe ptys:{DEVPTS_MAX + 8}")
    got = parse(res.out)
    assert got.get("ptys") == str(DEVPTS_MAX), res.out
    assert got.get("ptys-next") == "ENOSPC", res.out


def test_capabilities_are_docker_default(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(runtime, image(busybox_layer), "grep -E '^(Cap|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in res.out.strip().splitlines())
    import prctl

    caps = runtime.capabilities()
    expect = sum(1 << getattr(prctl, "CAP_" + c.upper()) for c in caps)
    assert int(fields["CapBnd"], 16) == expect
    assert int(fields["CapEff"], 16) == expect
    assert int(fields["CapPrm"], 16) == expect
    assert int(fields["CapInh"], 16) == 0 and int(fields["CapAmb"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert set(caps) <= set(DEFAULT_CAPS)


def test_non_root_user_has_no_capabilities(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(
        runtime, image(busybox_layer), "id -u; id -g; grep CapEff /proc/self/status", user="user"
    )
    lines = res.out.split("\n")
    assert lines[0] == "1000" and lines[1] == "1000"
    assert lines[2].split()[1] == "0000000000000000"


def test_only_stdio_is_open(runtime: Runtime, busybox_layer: Path) -> None:
    # A background sleep holds exactly what the container's command inherited.
    res = run(
        runtime, image(busybox_layer), "sleep 5 & ls /proc/1/fd; echo ---; ls /proc/$!/fd; kill $!"
    )
    init_fds, cmd_fds = res.out.split("---")
    assert set(init_fds.split()) == {"0", "1", "2"}
    assert set(cmd_fds.split()) == {"0", "1", "2"}


def test_init_is_sealed_memfd_not_host_binary(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(
        runtime,
        image(busybox_layer),
        "readlink /proc/1/exe; echo rl=$?; echo junk > /proc/1/exe; echo rc=$?;"
        " ls /proc/1/root/ | head -3",
    )
    # init is not dumpable: from inside, its exe and root cannot even be resolved (the
    # host sees the memfd: test_tenant_isolation).
    assert "rl=1" in res.out, res.out
    assert "rc=1" in res.out, res.out
    # The interpreter that forked the child is nowhere to be seen.
    assert "python" not in res.out.lower()


def test_no_host_paths_reachable(runtime: Runtime, busybox_layer: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"host-marker-{uuid.uuid4().hex}"
    marker.write_text("host")
    res = run(
        runtime,
        image(busybox_layer),
        f"cat {marker} /proc/1/root{marker} 2>/dev/null; echo rc=$?; cat /proc/mounts",
    )
    assert res.out.startswith("rc=1\n"), res.out
    # The only host paths a container sees are the overlay's own options.
    rest = [line for line in res.out.splitlines()[1:] if not line.startswith("overlay / ")]
    assert not any(str(tmp_path) in line for line in rest), rest


def test_exit_status_and_signals(runtime: Runtime, busybox_layer: Path) -> None:
    assert run(runtime, image(busybox_layer), "exit 3").status == 3
    assert run(runtime, image(busybox_layer), "kill -9 $$").status == 128 + 9
    assert run(runtime, image(busybox_layer), "nonexistent-cmd").status == 127


def test_init_reaps_orphans(runtime: Runtime, busybox_layer: Path) -> None:
    res = run(
        runtime,
        image(busybox_layer),
        "for i in 1 2 3 4 5; do (sh -c 'exit 0' &) ; done; "
        "i=0; while [ $i -lt 50 ]; do "
        "  z=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l); "
        "  [ $z -eq 0 ] && break; i=$((i+1)); usleep 20000; done; echo zombies=$z",
    )
    assert "zombies=0" in res.out


def test_readonly_bind_mount_is_read_only_and_root_stays_writable(
    runtime: Runtime, tmp_path: Path, busybox_layer: Path
) -> None:
    vol = tmp_path / "ro"
    vol.mkdir()
    (vol / "data").write_text("kept")
    res = run(
        runtime,
        image(busybox_layer),
        "echo x > /mnt/ro/data; echo vol=$?; echo y > /root-write; echo root=$?; cat /mnt/ro/data",
        mounts=[BindMount(source=str(vol), target="/mnt/ro", readonly=True)],
    )
    assert "vol=1" in res.out and "root=0" in res.out, res.out
    assert res.out.rstrip().endswith("kept") and (vol / "data").read_text() == "kept"


def test_bind_mount_target_symlink_stays_inside(
    runtime: Runtime, tmp_path: Path, busybox_layer: Path
) -> None:
    evil = make_busybox_layer(tmp_path / "evil")
    (evil / "home" / "user").rmdir()
    # Resolved inside the container's root, this is the container's /etc, never the host's.
    (evil / "home" / "user").symlink_to("/../../../../etc")
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data").write_text("volume")
    res = run(
        runtime,
        image(evil),
        "cat /etc/data",
        mounts=[BindMount(source=str(vol), target="/home/user")],
    )
    assert res.out.splitlines()[0] == "volume"
    assert not Path("/etc/data").exists()
    # A dangling link is refused, naming the step; nothing is created on the host.
    (evil / "home" / "user").unlink()
    (evil / "home" / "user").symlink_to("/../../../" + str(tmp_path / "escape"))
    with pytest.raises(ChildSetupError) as info:
        run(runtime, image(evil), "true", mounts=[BindMount(source=str(vol), target="/home/user")])
    assert info.value.step == "bind mounts"
    assert not (tmp_path / "escape").exists()


def test_symlinked_proc_is_refused_with_step(runtime: Runtime, tmp_path: Path) -> None:
    symlinked_proc_is_refused(runtime, tmp_path)


def test_child_failure_names_step_and_leaves_nothing(runtime: Runtime, busybox_layer: Path) -> None:
    cid = uuid.uuid4().hex * 2
    dirs = runtime.dirs(cid)
    runtime.create_dirs(dirs)
    spec = runtime.build_spec(cid, "x", image(busybox_layer), dirs, args=["true"])
    import dataclasses

    bad = dataclasses.replace(spec, rootfs=dataclasses.replace(spec.rootfs, workdir="/nonexistent"))
    with pytest.raises(ChildSetupError) as info:
        runtime.start(bad, CgroupLimits())
    assert info.value.step == "mount rootfs"
    assert runtime.cgroups is not None and runtime.cgroups.list() == []
    runtime.remove(cid)
    assert not dirs.base.exists()


def test_exec_and_stop_running_container(runtime: Runtime, busybox_layer: Path) -> None:
    cid = uuid.uuid4().hex * 2
    dirs = runtime.dirs(cid)
    runtime.create_dirs(dirs)
    try:
        spec = runtime.build_spec(cid, "ex", image(busybox_layer), dirs, args=["sleep", "1000"])
        pid = runtime.start(spec, CgroupLimits())
        r, w = os.pipe()
        child, master = runtime.exec(
            cid,
            pid,
            ProcessSpec(
                args=["sh", "-c", "hostname; cat /proc/1/cmdline | tr '\\0' ' '"], env=["PATH=/bin"]
            ),
            stdio=[w, w, w],
        )
        os.close(w)
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        os.close(r)
        assert master is None
        assert runtime.spawner.wait(child.pid, timeout=10) == 0
        text = out.decode()
        assert text.startswith("ex\n") and "sleep 1000" in text
        # A tty exec gets a PTY from the container's own devpts.
        child, master = runtime.exec(
            cid, pid, ProcessSpec(args=["tty"], env=["PATH=/bin"], tty=True)
        )
        assert master is not None
        got = b""
        try:
            while chunk := os.read(master, 4096):
                got += chunk
        except OSError:
            pass  # EIO once the slave side is closed
        os.close(master)
        assert got.strip() == b"/dev/pts/0"
        assert runtime.spawner.wait(child.pid, timeout=10) == 0
        # stop: SIGTERM reaches sleep through init.
        assert runtime.stop(cid, pid, timeout=5) == 128 + signal.SIGTERM
    finally:
        runtime.remove(cid)


def test_concurrent_starts_from_threads(runtime: Runtime, busybox_layer: Path) -> None:
    results: list[Result] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results.append(run(runtime, image(busybox_layer), f"echo {i}", hostname=f"h{i}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(int(r.out) for r in results) == list(range(8))


def test_spawner_death_is_survived(tmp_path: Path, busybox_layer: Path, cgroup_parent: str) -> None:
    """A running container outlives a crashed spawner; the runtime starts a new one."""
    sp = Spawner()
    rt = make_runtime(tmp_path / "state", tmp_path / "run", cgroup_parent, sp)
    cid = uuid.uuid4().hex * 2
    dirs = rt.dirs(cid)
    rt.create_dirs(dirs)
    try:
        spec = rt.build_spec(cid, "s", image(busybox_layer), dirs, args=["sleep", "1000"])
        pid = rt.start(spec, CgroupLimits())
        old = sp.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while sp.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sp.alive
        assert os.path.exists(f"/proc/{pid}")  # the container lives on
        res = run(rt, image(busybox_layer), "echo fresh")
        assert res.out.strip() == "fresh"
        assert rt.spawner.pid != old
        # Its exit status went with the dead spawner; stopping it still works.
        rt.stop(cid, pid, timeout=5)
        deadline = time.monotonic() + 10
        while not _zombie_or_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _zombie_or_gone(pid)
    finally:
        rt.remove(cid)
        rt.spawner.close()


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_start_trace_writes_steps_and_leaks_no_fd(
    tmp_path: Path, busybox_layer: Path, cgroup_parent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With REXECD_START_TRACE set, each child appends its steps' times (the spawner's
    first, in order) and the container still holds nothing but its stdio."""
    from rexecd.runtime.spawner import TRACE_ENV

    trace = tmp_path / "start.trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    sp = Spawner()
    monkeypatch.delenv(TRACE_ENV)
    rt = make_runtime(tmp_path / "state", tmp_path / "run", cgroup_parent, sp)
    try:
        res = run(rt, image(busybox_layer), "ls /proc/1/fd; echo ---; ls /proc/self/fd")
        init_fds, cmd_fds = res.out.split("---")
        assert set(init_fds.split()) == {"0", "1", "2"}
        # ls's own directory fd is the one more.
        assert len(set(cmd_fds.split()) - {"0", "1", "2"}) <= 1
        lines = trace.read_text().splitlines()
        assert len(lines) == 1
        tag, *fields = lines[0].split()
        assert re.fullmatch(r"[0-9a-f]{64}", tag)  # the container id
        names = [f.rpartition("=")[0] for f in fields]
        times = [int(f.rpartition("=")[2]) for f in fields]
        assert names[:3] == ["request", "fork", "child"]
        assert {"cgroup_join", "mount_rootfs", "seccomp", "exec_init"} <= set(names)
        assert names[-1] == "execve"
        assert times == sorted(times)
        assert trace.stat().st_mode & 0o777 == 0o600
    finally:
        sp.close()
