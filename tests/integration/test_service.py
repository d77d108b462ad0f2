"""Running rexecd as a service, on a real daemon: one daemon per state dir (flock), owner
marks on the host resources (a second daemon refuses to start and leaves the first's
containers alone), the lifecycle and access log lines, socket activation (the test
passes the listening fds itself, as systemd would), sd_notify, TLS, and the command
line's one-line errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deadlines import scaled
from tests.integration.daemon import ROOT, RX, Daemon, api, free_port, wait_status
from tests.integration.daemon_fixtures import (
    db_rows,
    pid_alive,
    poll,
    running_daemon,
    unique,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon needs root")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def create_running(d: Daemon, token: str, name: str) -> dict[str, Any]:
    code, body, _ = api(d, "POST", "/api/containers", token, {"image": "busybox", "name": name})
    assert code == 202, body
    return wait_status(d, token, name, "running")


def serve(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``rexecd serve`` expecting it to stop by itself (a refusal)."""
    return subprocess.run(
        [*RX, "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=scaled(timeout),
    )


def second_config(d: Daemon, base: Path, **changes: Any) -> Path:
    """A config for another daemon: ``d``'s own, with its own listeners, plus ``changes``."""
    cfg = yaml.safe_load(d.config.read_text())
    run = Path("/run") / f"rexecd-test-{unique('two')}"
    cfg.update(listen=[f"tcp:127.0.0.1:{free_port()}"], run_dir=str(run))
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[section] = value
    path = base / f"{unique('cfg')}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------ one owner


def test_second_daemon_on_a_state_dir_refuses_naming_the_holder(
    daemon: Daemon, tmp_path: Path
) -> None:
    assert daemon.proc is not None
    out = serve(second_config(daemon, tmp_path))
    assert out.returncode != 0
    assert f"state dir {daemon.state} is in use by rexecd (pid {daemon.proc.pid})" in out.stderr
    assert "Traceback" not in out.stderr
    # The first one is untouched and still serves.
    assert api(daemon, "GET", "/health", None)[0] == 200


def test_a_live_socket_is_never_unlinked(daemon: Daemon, tmp_path: Path) -> None:
    cfg = second_config(daemon, tmp_path, state_dir=str(tmp_path / "state"))
    data = yaml.safe_load(cfg.read_text())
    data["listen"] = [f"unix:{daemon.sock}"]
    cfg.write_text(yaml.safe_dump(data))
    before = daemon.sock.stat().st_ino
    out = serve(cfg)
    assert out.returncode != 0
    assert f"cannot listen on unix:{daemon.sock}: Address already in use" in out.stderr
    # The first daemon's socket is the same file, and answers.
    assert daemon.sock.stat().st_ino == before
    assert b'"status":"ok"' in _unix_get(daemon.sock, "/health")


@pytest.mark.parametrize("shared", ["cgroup", "network"])
def test_daemon_on_another_daemons_resources_refuses_and_touches_nothing(
    daemon: Daemon, tmp_path: Path, shared: str
) -> None:
    """Another state dir, but the first daemon's cgroup parent (or its bridge and nft
    table): it used to reconcile the first one's containers away with SIGKILL."""
    assert daemon.proc is not None
    token = daemon.token(unique("own"))
    name = unique("keep")
    c = create_running(daemon, token, name)
    (pid,) = db_rows(daemon, "SELECT pid FROM containers WHERE name = ?", name)[0]
    other = tmp_path / "state"
    if shared == "cgroup":
        # A network of its own: the cgroup parent is the only shared resource.
        tag = unique("n")[-4:]
        cfg = second_config(
            daemon,
            tmp_path,
            state_dir=str(other),
            **{
                "network.bridge": f"rxo{tag}",
                "network.nft_table": f"rxo_{tag}",
                "network.subnet": f"10.{240 + int(tag[:1], 16) % 10}.{int(tag[1:3], 16)}.0/24",
            },
        )
        what = "cgroup parent"
    else:
        cfg = second_config(
            daemon, tmp_path, state_dir=str(other), **{"cgroup.parent": f"{unique('cg')}"}
        )
        what = "nft table"
    try:
        out = serve(cfg)
    finally:
        _remove_host_objects(cfg, daemon)
    assert out.returncode != 0, out.stderr
    assert what in out.stderr and f"(pid {daemon.proc.pid})" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # Nothing of the first daemon's was touched: its container runs on, same init.
    assert pid_alive(pid)
    assert api(daemon, "GET", f"/api/containers/{name}", token)[1]["status"] == "running"
    assert c["status"] == "running"
    assert api(daemon, "DELETE", f"/api/containers/{name}", token)[0] in (200, 202, 204)


def _remove_host_objects(config: Path, first: Daemon) -> None:
    """What a second daemon made that is not the first one's (when the refusal fails)."""
    from rexecd.runtime.cgroups import open_driver
    from rexecd.runtime.network import Network, NetworkConfig

    cfg = yaml.safe_load(config.read_text())
    net = cfg["network"]
    if net["bridge"] != first.bridge:
        Network(
            NetworkConfig(bridge=net["bridge"], subnet=net["subnet"], nft_table=net["nft_table"])
        ).teardown_host()
    if cfg["cgroup"]["parent"] != first.cgroup_parent:
        drv = open_driver(cfg["cgroup"]["parent"])
        for name in drv.list():
            drv.open(name).destroy()
        drv.remove_parent()


def test_owner_marks_are_on_the_resources(daemon: Daemon) -> None:
    from rexecd.owner import Owner, bridge_resource, nft_resource

    me = Owner.parse(
        f"rexecd-owner id={(daemon.state / 'owner-id').read_text().strip()} dir={daemon.state}"
    )
    assert me is not None
    assert Owner.parse(nft_resource("inet", daemon.nft_table).read()) == me
    assert Owner.parse(nft_resource("bridge", daemon.nft_table).read()) == me
    assert Owner.parse(bridge_resource(daemon.bridge).read()) == me


# ------------------------------------------------------------------ logs


def test_lifecycle_and_access_log_lines(daemon: Daemon) -> None:
    user = unique("log")
    token = daemon.token(user)
    name = unique("life")
    c = create_running(daemon, token, name)
    cid = c["id"][:12]
    assert api(daemon, "POST", f"/api/containers/{name}/stop", token)[0] == 200
    assert api(daemon, "POST", f"/api/containers/{name}/start", token)[0] == 200
    wait_status(daemon, token, name, "running")
    # An exit from the host (a pid namespace's init ignores SIGKILL from inside).
    (pid,) = db_rows(daemon, "SELECT pid FROM containers WHERE name = ?", name)[0]
    os.kill(pid, signal.SIGKILL)
    stopped = wait_status(daemon, token, name, "stopped")
    # The exit's cause is shown on the stopped container, not only on errors.
    assert stopped["error_message"] == "container init exited with status 137"
    assert api(daemon, "DELETE", f"/api/containers/{name}", token)[0] in (200, 202, 204)

    def lines() -> list[str] | None:
        mine = [ln for ln in daemon.logs().splitlines() if f"id={cid}" in ln]
        return mine if any("container delete:" in ln for ln in mine) else None

    mine = poll(lines, what="the delete line")
    events = [ln.split("container ", 1)[1].split(":", 1)[0] for ln in mine]
    assert events == ["create", "start", "stop", "start", "exit", "delete"], mine
    exit_line = next(ln for ln in mine if "container exit:" in ln)
    assert f"user={user}" in exit_line
    assert "status=137 cause=signal:SIGKILL" in exit_line
    # One access line per request with user, status and latency; never the token.
    log = daemon.logs()
    assert token not in log and token[6:] not in log
    access = [ln for ln in log.splitlines() if f"user={user}" in ln and "aiohttp.access" in ln]
    assert any(f'"POST /api/containers/{name}/stop HTTP/1.1" 200' in ln for ln in access)
    assert all(re.search(r' req=[0-9a-f]{16} ".*" \d{3} \d+ \d+\.\d{3}s ', ln) for ln in access)


def exit_line(d: Daemon, cid: str) -> str:
    """The lifecycle ``exit`` line of container ``cid``, once the daemon has logged it."""

    def find() -> str | None:
        lines = d.logs().splitlines()
        return next(
            (ln for ln in lines if f"id={cid[:12]}" in ln and "container exit:" in ln), None
        )

    return poll(find, what=f"the exit line of {cid[:12]}")


def test_reconcile_exit_line(daemon: Daemon) -> None:
    """A container that died while no daemon ran: its exit is logged at start-up."""
    user = unique("rec")
    token = daemon.token(user)
    name = unique("gone")
    cid = create_running(daemon, token, name)["id"]
    (pid,) = db_rows(daemon, "SELECT pid FROM containers WHERE name = ?", name)[0]
    daemon.stop(kill=True)
    os.kill(pid, signal.SIGKILL)
    poll(lambda: not pid_alive(pid), what="init gone")
    daemon.start()
    line = exit_line(daemon, cid)
    assert f"user={user} status=stopped cause=reconcile" in line, line
    got = api(daemon, "GET", f"/api/containers/{name}", token)[1]
    assert got["error_message"] == "container stopped while the daemon was down"
    assert api(daemon, "DELETE", f"/api/containers/{name}", token)[0] in (200, 202, 204)


def test_session_expiry_exit_line(daemon: Daemon) -> None:
    user = unique("exp")
    token = daemon.token(user)
    name = unique("exp")
    cid = create_running(daemon, token, name)["id"]
    # The session ended a minute ago: the next expiry pass (every 10 s) stops it.
    db = sqlite3.connect(str(daemon.state / "state.db"), timeout=10)
    try:
        with db:
            db.execute(
                "UPDATE containers SET expires_at = ? WHERE name = ?",
                ("2000-01-01T00:00:00.000000Z", name),
            )
    finally:
        db.close()
    wait_status(daemon, token, name, "expired", timeout=60)
    line = exit_line(daemon, cid)
    assert f"user={user} status=expired cause=session-expiry" in line, line
    assert api(daemon, "DELETE", f"/api/containers/{name}", token)[0] in (200, 202, 204)


# ------------------------------------------------------------------ socket activation


def _activated(
    d: Daemon, socks: list[socket.socket], names: str, pid_ok: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``d``'s daemon as systemd would: the sockets at fds 3.., LISTEN_* set for
    the daemon's own pid (a shell sets LISTEN_PID=$$, then execs it)."""
    fds = [s.fileno() for s in socks]

    def move_fds() -> None:
        # Above the target range first, so dup2 never overwrites one not yet moved.
        high = [os.dup(fd) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)

    env = dict(os.environ, LISTEN_FDS=str(len(socks)), LISTEN_FDNAMES=names)
    pid = "$$" if pid_ok else "1"
    log = open(d.log, "ab")  # noqa: SIM115 - the daemon writes to it until stopped
    cmd = " ".join([*RX, "serve", "--config", str(d.config)])
    proc = subprocess.Popen(
        ["sh", "-c", f"LISTEN_PID={pid} exec {cmd}"],
        stdout=log,
        stderr=log,
        cwd=ROOT,
        env=env,
        preexec_fn=move_fds,
        pass_fds=list(range(3, 3 + len(socks))),
    )
    log.close()
    return proc


def _ready(url: str, proc: subprocess.Popen[bytes], d: Daemon, ctx: Any = None) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{d.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1, context=ctx) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    poll(up, timeout=60, what=f"{url} up")


def _unix_get(path: Path, target: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(scaled(10))
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_listen_fds_unix_and_tcp(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("act")
    d = Daemon(base)
    sock_path = base / "activated.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(sock_path))
    unix.listen(16)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    port = tcp.getsockname()[1]
    proc = _activated(d, [unix, tcp], "rexecd:rexecd")
    d.proc = proc
    try:
        _ready(f"http://127.0.0.1:{port}", proc, d)
        assert b'"status":"ok"' in _unix_get(sock_path, "/health")
        # The sockets of the config were not bound: systemd's replace them.
        assert not d.sock.exists()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
        assert "listening on unix:" + str(sock_path) in d.logs()
        d.stop()
        # A socket passed by systemd belongs to the .socket unit: never unlinked.
        assert sock_path.exists()
    finally:
        unix.close()
        tcp.close()
        d.close()


def test_listen_fds_for_another_pid_are_ignored(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("act")
    d = Daemon(base)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    proc = _activated(d, [tcp], "rexecd", pid_ok=False)
    d.proc = proc
    try:
        # LISTEN_PID is not ours: the config's listeners are used instead.
        _ready(d.url, proc, d)
    finally:
        tcp.close()
        d.close()


# ------------------------------------------------------------------ sd_notify


def test_ready_and_status_are_notified(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("notify")
    d = Daemon(base)
    where = base / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(where))
    listener.settimeout(scaled(60))
    os.environ["NOTIFY_SOCKET"] = str(where)
    try:
        d.start()
        got = []
        while not any(m.startswith("STATUS=") and "running" in m for m in got):
            got.extend(listener.recv(4096).decode().splitlines())
        # READY only once the API serves and reconcile is done.
        assert got[0].startswith("STATUS=starting: reconciling"), got
        assert got[1] == "READY=1", got
        assert any(m.startswith("STATUS=0 running, 0 containers") for m in got), got
        d.stop()
        while "STOPPING=1" not in got:
            got.extend(listener.recv(4096).decode().splitlines())
    finally:
        del os.environ["NOTIFY_SOCKET"]
        listener.close()
        d.close()


# ------------------------------------------------------------------ TLS


def _self_signed(base: Path) -> tuple[Path, Path]:
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_on_tcp_listeners(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(base)
    d = Daemon(base, overrides={"http": {"tls_cert": str(cert), "tls_key": str(key)}})
    log = open(d.log, "ab")  # noqa: SIM115 - the daemon writes to it until stopped
    d.proc = subprocess.Popen(
        [*RX, "serve", "--config", str(d.config)], stdout=log, stderr=log, cwd=ROOT
    )
    log.close()
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        _ready(f"https://127.0.0.1:{d.port}", d.proc, d, ctx)
        # Plain HTTP on the TLS port gets no answer.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{d.port}/health", timeout=scaled(5))
        # The unix socket stays plain HTTP (its permissions guard it).
        assert b'"status":"ok"' in _unix_get(d.sock, "/health")
        assert "(tls)" in d.logs()
        # TLS, so no warning about clear-text tokens.
        assert "not a loopback address" not in d.logs()
    finally:
        d.close()


def test_plain_tcp_on_a_public_address_is_warned_about(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    d = Daemon(tmp_path_factory.mktemp("warn"), overrides={"listen": [f"tcp:0.0.0.0:{port}"]})
    d.port = port
    try:
        d.start()
        assert f"plain HTTP on tcp:0.0.0.0:{port}, which is not a loopback address" in d.logs()
    finally:
        d.close()


# ------------------------------------------------------------------ command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RX, *args], capture_output=True, text=True, cwd=ROOT, timeout=scaled(60)
    )


def test_version() -> None:
    from rexecd import __version__

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"rexecd {__version__}"


def test_config_mistakes_are_one_line(tmp_path: Path) -> None:
    missing = _cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"rexecd: {tmp_path / 'nope.yaml'}: config file does not exist"
    )
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("http: {tls_cert: /x}\n")
    out = _cli("serve", "--config", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "tls_cert and http.tls_key go together" in out.stderr
    tarball = _cli("image", "import", "--state-dir", str(tmp_path), str(tmp_path / "no.tar"))
    assert tarball.returncode != 0 and "Traceback" not in tarball.stderr
    assert tarball.stderr.strip() == f"rexecd: no such file: {tmp_path / 'no.tar'}"


def test_non_root_mistakes_are_one_line(tmp_path: Path) -> None:
    """As an unprivileged user: the daemon and an image import say so in one line."""
    py = Path(sys.executable)
    if not os.access(py, os.X_OK) or any(
        not (os.stat(p).st_mode & 0o001) for p in [*py.parents][:-1] if p.is_dir()
    ):
        pytest.skip("the venv is not reachable by an unprivileged user here")
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, want in (
        (["serve"], "rexecd: the daemon needs root"),
        (["image", "import", "--state-dir", str(tmp_path), "/etc/hostname"], "permission"),
    ):
        out = subprocess.run(
            [*drop, *RX, *args], capture_output=True, text=True, env=env, timeout=scaled(60)
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert want in out.stderr
