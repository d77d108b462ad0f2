"""Integration: what a hostile tenant with a shell in a container and a low-tier token
must not reach (issue 10): the daemon's own descriptors (its log held as stdio), the
kernel keyring of the host or of another container, a ptrace of pid 1 that leaves it
stopped, and another user's token read back from the daemon's log.

The syscalls busybox has no applet for come from ``probe.c``, compiled statically here
and uploaded into each container through the files API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from rexecd.runtime import procinfo
from tests.deadlines import scaled
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    db_rows,
    poll,
    running_daemon,
    seccomp_tiers,
    unique,
)
from tests.integration.terminal_client import terminal

PROBE_SRC = Path(__file__).with_name("probe.c")
EVENTS = "/api/containers/events"
CAP_SYS_PTRACE = 19


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the isolation probe (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(PROBE_SRC)], check=True)
    return out


@pytest.fixture(scope="module")
def host_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """(description, payload, file that will hold its id) of the key in the daemon's
    session keyring."""
    tag = secrets.token_hex(6)
    id_file = tmp_path_factory.mktemp("keyring") / "host-key-id"
    return f"rexecd-test-host-{tag}", f"host-secret-{tag}", id_file


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, probe: Path, host_key: tuple[str, str, Path]
) -> Iterator[Daemon]:
    """A daemon started in a session keyring of its own holding ``host_key``, as a daemon
    started from an operator's login session holds that session's keys."""
    with running_daemon(tmp_path_factory, launcher=_in_keyring(probe, host_key)) as d:
        yield d


def _in_keyring(probe: Path, host_key: tuple[str, str, Path]) -> list[str]:
    """The launcher that starts a daemon in a session keyring holding ``host_key``."""
    desc, payload, id_file = host_key
    return [str(probe), "keyring-exec", str(id_file), desc, payload]


@pytest.fixture(scope="module")
def unfiltered_daemon(
    tmp_path_factory: pytest.TempPathFactory, probe: Path, host_key: tuple[str, str, Path]
) -> Iterator[Daemon]:
    """``daemon`` with the tenant tiers' seccomp filter off: the default filter refuses
    keyctl outright, and the keyring test checks the defence beneath it (a session
    keyring per process) on its own."""
    tiers = seccomp_tiers(guest="unconfined", free="unconfined")
    with running_daemon(tmp_path_factory, tiers, launcher=_in_keyring(probe, host_key)) as d:
        yield d


@contextlib.asynccontextmanager
async def tenant(d: Daemon, *names: str) -> AsyncIterator[ApiClient]:
    """A fresh user with running containers ``names``, removed afterwards."""
    tier = "guest" if len(names) < 2 else "free"  # a low tier, with room for ``names``
    async with ApiClient(d, d.token(unique("tenant"), tier=tier)) as c:
        try:
            for name in names:
                (await c.create(name)).expect(202)
            for name in names:
                await c.wait_status(name, "running")
            yield c
        finally:
            for name in names:
                await c.remove(name)


async def install_probe(c: ApiClient, name: str, probe: Path) -> str:
    form = aiohttp.FormData()
    form.add_field("file", probe.read_bytes(), filename="probe")
    (await c.post(f"/api/containers/{name}/files", data=form, params={"path": "/tmp"})).expect(200)
    await c.sh(name, "chmod 755 /tmp/probe")
    return "/tmp/probe"


async def run(c: ApiClient, name: str, command: str) -> tuple[int, str]:
    r = (await c.exec(name, command)).expect(200)
    return r["exit_code"], r["stdout"] + r["stderr"]


def init_pid(d: Daemon, name: str) -> int:
    rows = db_rows(d, "SELECT pid FROM containers WHERE name = ? AND status = 'running'", name)
    assert rows and rows[0][0], f"no running init recorded for {name}: {rows}"
    pid: int = rows[0][0]
    return pid


def container_pids(init: int) -> list[int]:
    """Host pids of every process in the pid namespace of ``init``."""
    ns = os.readlink(f"/proc/{init}/ns/pid")
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    pids.append(int(entry))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def foreign_fds(pid: int, own_devices: set[int]) -> list[str]:
    """The descriptors of ``pid`` that are not the container's own objects: anything
    but a pipe, socket or anonymous inode, or a device node of the container's /dev."""
    bad = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(path)
            st = os.stat(path)
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith(("pipe:", "socket:", "anon_inode:")):
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_dev in own_devices:
            continue
        bad.append(f"pid {pid} {cmdline(pid)} fd {fd} -> {target} (dev {st.st_dev:#x})")
    return bad


# ------------------------------------------------------------------ descriptors


async def test_container_processes_hold_only_their_own_fds(daemon: Daemon) -> None:
    """init, an exec and a terminal shell hold no descriptor of the host's: not the
    daemon's log (which held other users' requests), not the host's /dev/null."""
    name = unique("fds")
    async with tenant(daemon, name) as c:
        tag = str(29000 + secrets.randbelow(900))
        sleeper = asyncio.ensure_future(c.exec(name, f"exec sleep {tag}"))
        sleep_pid: int | None = None
        try:
            async with terminal(daemon, c.token or "", name, id="fds") as term:
                shell = int((await term.run("echo $$")).strip())
                init = init_pid(daemon, name)

                def exec_pid() -> int | None:
                    for pid in container_pids(init):
                        if cmdline(pid) == ["sleep", tag]:
                            return pid
                    return None

                sleep_pid = poll(exec_pid, what="the exec'd sleep")
                own = {
                    os.stat(f"/proc/{init}/root/dev/null").st_dev,
                    os.stat(f"/proc/{init}/root/dev/pts/ptmx").st_dev,
                }
                pids = container_pids(init)
                # init, the exec, the terminal's shell (its pid inside is ``shell``).
                assert init in pids and sleep_pid in pids and len(pids) >= 3, pids
                shells = [p for p in pids if _inner_pid(p) == shell]
                assert shells, f"terminal shell {shell} not found among {pids}"
                bad = [line for pid in pids for line in foreign_fds(pid, own)]
                assert not bad, "\n".join(bad)

                # The tenant's own view: no path of the host in any fd of any process.
                _, inside = await run(c, name, "ls -l /proc/[0-9]*/fd/ 2>&1")
                assert "/proc/1/fd" in inside, inside
                for host_path in (str(daemon.base), str(daemon.log), str(daemon.state)):
                    assert host_path not in inside, inside
                # init is not dumpable: its fds cannot be opened from inside at all.
                code, out = await run(c, name, "cat /proc/1/fd/2 </dev/null 2>&1")
                assert code != 0 and "ermission denied" in out, (code, out)
                code, out = await run(c, name, "echo hostile >> /proc/1/fd/1")
                assert code != 0, out
        finally:
            if sleep_pid is None:
                sleeper.cancel()
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sleep_pid, signal.SIGKILL)
        r = await sleeper
        assert r.status == 200 and r["exit_code"] == 128 + signal.SIGKILL, r.body
    assert "hostile" not in daemon.logs()


def _inner_pid(pid: int) -> int | None:
    """The pid of host pid ``pid`` in its innermost pid namespace (NSpid's last field)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


# ------------------------------------------------------------------ tokens and logs


async def test_token_never_appears_in_daemon_log(daemon: Daemon) -> None:
    """Whatever carries it (?token= on an upgrade or a plain request, the header, the
    subprotocol, a Referer), a token is not written to the daemon's log."""
    tok = daemon.token(unique("logged"))
    marker = secrets.token_hex(6)
    async with ApiClient(daemon, tok) as c:
        with contextlib.suppress(aiohttp.WSServerHandshakeError):
            ws = await c.ws(f"{EVENTS}?token={tok}&m={marker}", headers={})
            await ws.close()
        ws = await c.ws(f"{EVENTS}?m={marker}", protocols=("rexec.v1", f"rexec.token.{tok}"))
        await ws.close()
        # A token protocol without rexec.v1: aiohttp logs the protocols it refused.
        ws = await c.ws(f"{EVENTS}?m={marker}", protocols=(f"rexec.token.{tok}",))
        await ws.close()
        (await c.get(f"/api/containers?token={tok}&m={marker}", anonymous=True)).expect(401)
        referer = {"Referer": f"http://example.invalid/app?token={tok}"}
        (await c.get(f"/api/containers?m={marker}", headers=referer)).expect(200)
        (await c.get(f"/api/containers?access_token={tok}&m={marker}")).expect(200)

    def logged() -> bool:
        return daemon.logs().count(f"m={marker}") >= 6

    poll(logged, what="the access log lines of the requests")
    log = daemon.logs()
    assert tok not in log
    assert tok[len("rexec_") :][:16] not in log
    assert "token=<redacted>" in log


@pytest.fixture(scope="module")
def legacy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose config switches the legacy ``?token=`` on."""
    with running_daemon(tmp_path_factory, {"auth": {"ws_query_token": True}}) as d:
        yield d


async def test_query_token_refused_by_default(daemon: Daemon) -> None:
    """``?token=`` on an upgrade is a legacy fallback the config must switch on."""
    tok = daemon.token(unique("qt"))
    async with ApiClient(daemon, tok) as c:
        for path in (EVENTS, f"/ws/terminal/{unique('none')}"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await c.ws(f"{path}?token={tok}", headers={})
            assert exc.value.status == 401, path
        ws = await c.ws(EVENTS)  # the header still works
        await ws.close()


async def test_query_token_accepted_when_enabled(legacy_daemon: Daemon) -> None:
    tok = legacy_daemon.token(unique("qt"))
    async with ApiClient(legacy_daemon, tok) as c:
        ws = await c.ws(f"{EVENTS}?token={tok}", headers={})
        try:
            msg = await ws.receive_json(timeout=scaled(10))
            assert msg["type"] == "list"
        finally:
            await ws.close()
    poll(lambda: "token=<redacted>" in legacy_daemon.logs(), what="the upgrade's access line")
    assert tok not in legacy_daemon.logs()


# ------------------------------------------------------------------ keyrings


async def test_keys_of_host_and_other_containers_are_out_of_reach(
    unfiltered_daemon: Daemon, probe: Path, host_key: tuple[str, str, Path]
) -> None:
    """Neither a key of the daemon's session (the host's) nor one a process of
    container A holds can be found, read or overwritten from container B, even with
    the seccomp filter (which refuses keyctl) off."""
    daemon = unfiltered_daemon
    a, b = unique("keya"), unique("keyb")
    host_desc, host_secret, id_file = host_key
    host_id = int(id_file.read_text())
    async with tenant(daemon, a) as ca, tenant(daemon, b) as cb:
        pa = await install_probe(ca, a, probe)
        pb = await install_probe(cb, b, probe)
        desc_a, secret_a = f"tenant-a-{secrets.token_hex(4)}", f"a-secret-{secrets.token_hex(4)}"
        await ca.sh(a, f"{pa} key-hold {desc_a} {secret_a} >/tmp/key.id 2>&1 </dev/null &")

        async def key_a() -> int | None:
            out = await ca.sh(a, "cat /tmp/key.id 2>/dev/null; true")
            return int(out) if out.strip().isdigit() else None

        id_a = await apoll(key_a, what="container A's key")
        # The probe works in B: a key of its own session is found and read back.
        code, out = await run(cb, b, f"{pb} key-read $({pb} key-add own v1)")
        assert (code, out.strip()) == (0, "payload: v1"), out

        for key_id, desc, secret in ((host_id, host_desc, host_secret), (id_a, desc_a, secret_a)):
            code, out = await run(cb, b, f"{pb} key-search {desc}")
            assert code == 1 and "ENOKEY" in out, out
            code, out = await run(cb, b, f"{pb} key-read {key_id}")
            assert code == 1 and secret not in out, out
            code, out = await run(cb, b, f"{pb} key-update {key_id} overwritten")
            assert code == 1 and "update: ok" not in out, out
        # Nor from another process of A itself: each exec has a session of its own.
        code, out = await run(ca, a, f"{pa} key-search {host_desc}")
        assert code == 1 and "ENOKEY" in out, out


async def test_keyctl_refused_by_the_default_filter(daemon: Daemon, probe: Path) -> None:
    """Under the default seccomp profile no key can be made or looked up at all."""
    name = unique("keyf")
    async with tenant(daemon, name) as c:
        p = await install_probe(c, name, probe)
        code, out = await run(c, name, f"{p} key-add own v1")
        assert code == 1 and "EPERM" in out, out


# ------------------------------------------------------------------ pid 1


async def test_init_cannot_be_ptraced_from_inside(daemon: Daemon, probe: Path) -> None:
    """PTRACE_ATTACH and PTRACE_SEIZE of pid 1 fail, while tracing the tenant's own
    processes still works (so the refusal is about init, not ptrace in general)."""
    name = unique("ptrace")
    async with tenant(daemon, name) as c:
        p = await install_probe(c, name, probe)
        # Non-dumpable only stops a tracer that lacks CAP_SYS_PTRACE: none may have it.
        bounding = (await c.sh(name, "grep CapBnd /proc/self/status")).split()[1]
        assert not int(bounding, 16) & (1 << CAP_SYS_PTRACE), bounding
        code, out = await run(c, name, f"{p} ptrace 1")
        assert code == 1, out
        assert re.search(r"^attach: EPERM$", out, re.M) and re.search(r"^seize: EPERM$", out, re.M)
        code, out = await run(c, name, f"sleep 60 & {p} ptrace $!; kill $!")
        assert code == 0 and "attach: ok" in out, out
        init = init_pid(daemon, name)
        assert procinfo.state(init) not in ("T", "t")
        # What the host sees of it: the sealed memfd, no file of the host.
        assert os.readlink(f"/proc/{init}/exe").startswith("/memfd:rexec-init")
        assert await c.sh(name, "echo alive") == "alive\n"


async def test_stopped_init_is_continued_by_the_daemon(daemon: Daemon) -> None:
    """An init stopped from the host (it reaps nothing while stopped) is noticed,
    continued, logged and recorded in the event log."""
    name = unique("stopped")
    async with tenant(daemon, name) as c:
        pid = init_pid(daemon, name)
        db_id = (await c.container(name))["db_id"]
        os.kill(pid, signal.SIGSTOP)
        try:

            def continued() -> bool:
                return bool(
                    db_rows(
                        daemon,
                        "SELECT seq FROM events WHERE type = 'init_resumed' "
                        "AND container_db_id = ?",
                        db_id,
                    )
                )

            poll(continued, what="the daemon to continue the stopped init")
            poll(lambda: procinfo.state(pid) not in ("T", "t"), what="init to run again")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert f"init (pid {pid}) of container {name} was stopped" in daemon.logs()
        # It reaps again: the orphan left by this exec does not stay a zombie.
        await c.sh(name, "sh -c 'true &'")

        async def no_zombie() -> bool:
            return "Z" not in await c.sh(name, "ps -o stat | tail -n +2")

        await apoll(no_zombie, what="init to reap the orphan")
