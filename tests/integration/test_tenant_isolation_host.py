"""What a hostile tenant (a shell in a container, a low-tier token) must not get: host
paths of the daemon's state and run dirs through /proc or /sys, a host port taken from
under a host service by a port forward, a name with a trailing newline, and containers
that run without limits because cgroups are unusable.

Traffic stays on the host's loopback; every test uses names of its own."""

from __future__ import annotations

import contextlib
import errno
import re
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    cleaning,
    db_rows,
    running_daemon,
    unique,
)

PORT_MIN, PORT_MAX = 20000, 29999


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


# ------------------------------------------------------------------ host paths


# Run inside the container: every regular file of /proc (bounded in depth, skipping
# files that are huge or block: pagemap, mem, kmsg, kcore, kpage*) and every file of
# /sys is searched for each line of /tmp/patterns in turn (busybox grep -o reports one
# pattern per line, so one grep per pattern), printing "hit<N>:<file>"; then the
# targets of the magic links under /proc/<pid> are printed as "link:<target>". Each
# walk is bounded in time and prints its exit status, so a walk cut short fails the
# test instead of passing it.
SCAN = r"""
timeout -s KILL 60 find /proc -maxdepth 4 \( -name pagemap -o -name mem -o -name kmsg \
    -o -name kcore -o -name 'kpage*' -o -name task -o -name clear_refs \) -prune \
    -o -type f -print > /tmp/files
echo "find-proc=$?"
timeout -s KILL 60 find /sys -type f >> /tmp/files
echo "find-sys=$?"
echo "files=$(wc -l < /tmp/files)"
n=0
while IFS= read -r p; do
    n=$((n+1))
    timeout -s KILL 60 xargs grep -lsF -e "$p" < /tmp/files > /tmp/hits
    echo "grep$n=$?"
    sed "s|^|hit$n:|" /tmp/hits
done < /tmp/patterns
for l in /proc/[0-9]*/fd/* /proc/[0-9]*/cwd /proc/[0-9]*/exe /proc/[0-9]*/root \
    /proc/[0-9]*/map_files/*; do
    t=$(readlink "$l") && echo "link:$t"
done
echo "links=done"
"""


async def test_no_state_or_run_dir_path_is_readable_in_proc_or_sys(daemon: Daemon) -> None:
    """Another tenant's volume (its image under the state dir, its mount under the run
    dir, named by user id and container name) shows nowhere in what a container can
    read, and neither does any path under either dir: the overlay's layer paths in
    its own mountinfo included."""
    async with (
        ApiClient(daemon, daemon.token(unique("va"))) as a,
        ApiClient(daemon, daemon.token(unique("vb"))) as b,
        cleaning(a) as a_refs,
        cleaning(b) as b_refs,
    ):
        victim = await a.create_running(unique("victim"))
        a_refs.append(victim["id"])
        me = await b.create_running(unique("snoop"))
        b_refs.append(me["id"])
        # The victim's volume is loop-mounted now: its backing file is a host path.
        assert (daemon.state / "volumes" / victim["user_id"] / f"{victim['name']}.img").exists()

        mac = (await b.sh(me["id"], "cat /sys/class/net/eth0/address")).strip()
        leaks = list(
            dict.fromkeys(
                [
                    str(daemon.state),
                    str(daemon.state.resolve()),
                    str(daemon.run),
                    victim["user_id"],
                    victim["name"],
                    victim["id"],
                ]
            )
        )
        # Controls: strings the walk must find, or it proves nothing. The hostname is
        # in /proc/sys/kernel/hostname, the MAC in /sys/devices/virtual/net/eth0.
        controls = [me["name"], mac]
        patterns = leaks + controls
        await b.sh(
            me["id"], "printf '%s\\n' " + " ".join(f"'{p}'" for p in patterns) + " > /tmp/patterns"
        )
        r = (await b.exec(me["id"], SCAN, timeout_seconds=280)).expect(200)
        out: str = r["stdout"]

        status = dict(re.findall(r"^([a-z-]+[0-9]*)=(\S+)$", out, re.M))
        assert status.get("links") == "done", out[-3000:]
        # find: 0, or 1 for unreadable entries; xargs: 0 (a match) or 123 (a grep that
        # matched nothing or hit unreadable files). 137 would be a walk's timeout.
        assert status["find-proc"] in ("0", "1") and status["find-sys"] in ("0", "1"), status
        for i in range(1, len(patterns) + 1):
            assert status[f"grep{i}"] in ("0", "123"), status
        assert int(status["files"]) > 1000, status
        found: dict[str, list[str]] = {p: [] for p in patterns}
        for i, where in re.findall(r"^hit([0-9]+):(.*)$", out, re.M):
            found[patterns[int(i) - 1]].append(where)
        for target in re.findall(r"^link:(.*)$", out, re.M):
            for p in patterns:
                if p in target:
                    found[p].append(f"a /proc link to {target}")
        for p in controls:
            assert found[p], f"the walk never read {p!r}: {out[-3000:]}"
        leaked = {p: where for p in leaks if (where := found[p])}
        assert leaked == {}, leaked


# ------------------------------------------------------------------ port forwards


def _bind(port: int, proto: str = "tcp", reuse: bool = True, host: str = "127.0.0.1") -> int:
    """0 when a host service could bind ``host:port`` now, else the errno."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        if reuse:
            # What servers set: it must not get a forwarded port past the holder.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno or -1
        if proto == "tcp":
            s.listen(1)
    return 0


@contextlib.contextmanager
def host_listener(port: int | None = None) -> Iterator[socket.socket]:
    """A TCP service on 127.0.0.1, on ``port`` or a free one of the forward range."""
    s = socket.socket()
    try:
        if port is not None:
            s.bind(("127.0.0.1", port))
        else:
            for _ in range(200):
                try:
                    s.bind(("127.0.0.1", PORT_MIN + secrets.randbelow(PORT_MAX - PORT_MIN)))
                    break
                except OSError:
                    continue
            else:
                raise AssertionError("no free port in the forward range")
        s.listen(8)
        s.settimeout(5)
        yield s
    finally:
        s.close()


def has_forward(d: Daemon, port: int, proto: str = "tcp") -> bool:
    out = subprocess.run(
        ["nft", "list", "map", "inet", d.nft_table, f"{proto}_forwards"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.search(rf"\b{port} : ", out) is not None


async def test_port_forward_holds_its_host_port_until_deleted(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("ph"))) as c, cleaning(c) as refs:
        ct = await c.create_running(unique("ph"))
        refs.append(ct["id"])
        base = f"/api/containers/{ct['id']}/port-forwards"
        for proto in ("tcp", "udp"):
            fwd = (await c.post(base, {"container_port": 80, "protocol": proto})).expect(201)
            port = fwd["host_port"]
            # A host service starting after the forward learns the port is taken,
            # with or without SO_REUSEADDR, on loopback or on every address.
            assert _bind(port, proto) == errno.EADDRINUSE, proto
            assert _bind(port, proto, reuse=False) == errno.EADDRINUSE, proto
            assert _bind(port, proto, host="0.0.0.0") == errno.EADDRINUSE, proto
            (await c.delete(f"{base}/{fwd['id']}")).expect(200)
            assert _bind(port, proto) == 0, f"{proto} port {port} still held after delete"
        # A stop ends the forwards, and frees their ports with them.
        fwd = (await c.post(base, {"container_port": 80})).expect(201)
        assert _bind(fwd["host_port"]) == errno.EADDRINUSE
        (await c.post(f"/api/containers/{ct['id']}/stop")).expect(200)
        assert _bind(fwd["host_port"]) == 0


async def test_forward_on_a_port_a_host_service_holds_is_409(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("pc"))) as c, cleaning(c) as refs:
        ct = await c.create_running(unique("pc"))
        refs.append(ct["id"])
        base = f"/api/containers/{ct['id']}/port-forwards"
        with host_listener() as srv:
            port = srv.getsockname()[1]
            r = await c.post(base, {"container_port": 80, "host_port": port})
            r.expect(409)
            assert r["error"] == f"host port {port}/tcp is already in use"
            assert (await c.get(base)).expect(200)["count"] == 0
            assert not has_forward(daemon, port)
            # The service keeps its clients.
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = srv.accept()
                conn.close()


async def test_restarted_daemon_takes_forwarded_ports_back(daemon: Daemon) -> None:
    """A forward kept over a restart holds its port again; one whose port a host
    service took while the daemon was down is dropped, and the service keeps it."""
    tok = daemon.token(unique("pr"))
    async with ApiClient(daemon, tok) as c:
        ct = await c.create_running(unique("pr"))
        base = f"/api/containers/{ct['id']}/port-forwards"
        kept = (await c.post(base, {"container_port": 80})).expect(201).body
        lost = (await c.post(base, {"container_port": 81})).expect(201).body
    try:
        daemon.stop(kill=True)
        # The dead daemon's holders died with it: a host service may take the port.
        with host_listener(lost["host_port"]) as srv:
            daemon.start()
            assert _bind(kept["host_port"]) == errno.EADDRINUSE
            async with ApiClient(daemon, tok) as c:
                listed = (await c.get(base)).expect(200).body
            assert listed == {"port_forwards": [kept], "count": 1}
            assert has_forward(daemon, kept["host_port"])
            assert not has_forward(daemon, lost["host_port"])
            assert not db_rows(daemon, "SELECT id FROM port_forwards WHERE id = ?", lost["id"])
            with socket.create_connection(("127.0.0.1", lost["host_port"]), timeout=5):
                conn, _ = srv.accept()  # the host service's client, not the container's
                conn.close()
        async with ApiClient(daemon, tok) as c:
            (await c.delete(f"{base}/{kept['id']}")).expect(200)
        assert _bind(kept["host_port"]) == 0
    finally:
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.start()
        async with ApiClient(daemon, tok) as c:
            await c.remove(ct["id"])


# ------------------------------------------------------------------ names


async def test_names_with_a_trailing_newline_are_400_and_create_nothing(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("nl"))) as c, cleaning(c) as refs:
        user_id = (await c.get("/api/tokens/validate")).expect(200)["user_id"]
        for body in (
            {"image": "busybox", "name": "x\n"},
            {"image": "busybox\n"},
            {"image": "busybox:latest\n"},
            {"image": "busybox", "environment": {"K\n": "v"}},
        ):
            r = await c.post("/api/containers", body)
            if r.status == 202:
                refs.append(r["id"])
            assert r.status == 400, (body, r.status, r.body)
            assert "error" in r.body
        status, _, frames = await c.stream_create({"image": "busybox", "name": "y\n"})
        assert status == 400, frames
        listed = (await c.get("/api/containers")).expect(200)
        assert listed["count"] == 0, listed.body
        assert db_rows(daemon, "SELECT name FROM containers WHERE user_id = ?", user_id) == []
        volumes: Path = daemon.state / "volumes" / user_id
        assert not volumes.exists() or list(volumes.iterdir()) == []

        ct = await c.create_running(unique("nl"))
        refs.append(ct["id"])
        r = await c.patch(f"/api/containers/{ct['id']}/settings", {"name": "z\n"})
        assert r.status == 400, r.body
        assert (await c.container(ct["id"]))["name"] == ct["name"]


# ------------------------------------------------------------------ limits


def _without_cgroups(
    tmp_path_factory: pytest.TempPathFactory, allow: bool
) -> contextlib.AbstractContextManager[Daemon]:
    # A cgroup root with no hierarchy mounted: the daemon's real probe finds nothing.
    root = tmp_path_factory.mktemp("no-cgroup-root")
    overrides = {"cgroup": {"root": str(root), "allow_unlimited": allow}}
    return running_daemon(tmp_path_factory, {**overrides, "network": {"enabled": False}})


@pytest.fixture
def refusing_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with _without_cgroups(tmp_path_factory, allow=False) as d:
        yield d


@pytest.fixture
def unlimited_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with _without_cgroups(tmp_path_factory, allow=True) as d:
        yield d


async def test_without_cgroups_containers_are_refused_and_health_is_degraded(
    refusing_daemon: Daemon,
) -> None:
    d = refusing_daemon
    async with ApiClient(d, d.token(unique("ng"))) as c, cleaning(c) as refs:
        health = (await c.get("/health", anonymous=True)).expect(200).body
        assert health["status"] == "degraded" and health["cgroup"] == "none", health
        assert "cgroup" in health["reason"] and "not started" in health["reason"], health
        r = await c.create(unique("ng"))
        if r.status == 202:
            refs.append(r["id"])
        assert r.status == 503, r.body
        assert r["code"] == "runtime_unavailable"
        assert "cgroups unavailable" in r["error"] and "limit" in r["error"], r.body
        assert (await c.get("/api/containers")).expect(200)["count"] == 0
        status, _, frames = await c.stream_create({"image": "busybox"})
        assert status == 503, frames


async def test_allow_unlimited_runs_containers_and_health_stays_degraded(
    unlimited_daemon: Daemon,
) -> None:
    d = unlimited_daemon
    tok = d.token(unique("nu"))
    name = unique("nu")
    try:
        async with ApiClient(d, tok) as c:
            ct = await c.create_running(name)
            assert (await c.sh(ct["id"], "echo hi")).strip() == "hi"
            health = (await c.get("/health", anonymous=True)).expect(200).body
            assert health["status"] == "degraded", health
            assert "without limits" in health["reason"], health

        # The same host with unlimited containers no longer allowed: the running one
        # is re-adopted, but nothing starts again, and a refused restart leaves it be.
        cfg = yaml.safe_load(d.config.read_text())
        cfg["cgroup"]["allow_unlimited"] = False
        d.config.write_text(yaml.safe_dump(cfg))
        d.restart()
        async with ApiClient(d, tok) as c:
            r = await c.post(f"/api/containers/{name}/restart")
            assert r.status == 503, r.body
            assert (await c.container(name))["status"] == "running"
            (await c.post(f"/api/containers/{name}/stop")).expect(200)
            assert (await c.post(f"/api/containers/{name}/start")).status == 503
            assert (await c.container(name))["status"] == "stopped"
    finally:
        # No cgroup to kill it by: only the daemon can stop this container.
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        async with ApiClient(d, tok) as c:
            await c.remove(name)
