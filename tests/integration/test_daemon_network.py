"""Daemon networking end to end, over HTTP like a client: host <-> container, who may talk
to whom, network_mode none, bandwidth at the tier's rate, port forwards, nothing left on
the host after many create/delete cycles, and addresses and forwards kept by a restart.

All traffic stays on loopback and inside the test daemon's own bridge and subnet."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rexecd.runtime.network.naming import host_ifname, ifb_ifname
from tests.integration.daemon import Daemon, free_port
from tests.integration.daemon_fixtures import (
    ApiClient,
    cleaning,
    db_rows,
    leftovers,
    running_daemon,
    unique,
)

# Host ports on the gateway address: GW_PORT and SINK_PORT are opened to containers by
# the daemon's config (network.gateway_tcp_ports), CLOSED_PORT is not.
GW_PORT = free_port()
SINK_PORT = free_port()
CLOSED_PORT = free_port()
SHAPED_MBPS = 10
TOLERANCE = 0.15
# 4 s at 10 Mbit/s: long enough that tbf's burst and TCP's start are noise.
TRANSFER_BYTES = 5_000_000
CYCLES = 50

# A one-connection-at-a-time echo service for busybox nc -ll -e: "ping" -> "pong:ping".
ECHO_SH = '#!/bin/sh\nread line\necho "pong:$line"\n'

# A tier of its own for the shaping test: every field, as the config requires.
SHAPED_TIER = {
    "cpu_millicores": 4000,
    "memory_mb": 4096,
    "disk_mb": 20480,
    "containers": 10,
    "session_hours": None,
    "network_mbps": SHAPED_MBPS,
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    overrides = {
        "network": {"gateway_tcp_ports": [GW_PORT, SINK_PORT]},
        "tiers": {"pro": SHAPED_TIER},
    }
    with running_daemon(tmp_path_factory, overrides) as d:
        yield d


def gateway(d: Daemon) -> str:
    return str(ipaddress.IPv4Network(d.subnet).network_address + 1)


# ------------------------------------------------------------------ host side


class HostServer:
    """A TCP service on the host, in a thread: answers "pong:<line>", or with ``sink``
    counts what one connection sends and times it from the first byte to EOF."""

    def __init__(self, ip: str, port: int, sink: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.sink = sink
        self.accepted = 0
        self.received = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(30)
                try:
                    self._sink(conn) if self.sink else self._echo(conn)
                except OSError:
                    pass

    def _echo(self, conn: socket.socket) -> None:
        line = conn.makefile("rb").readline().strip()
        conn.sendall(b"pong:" + line + b"\n")

    def _sink(self, conn: socket.socket) -> None:
        while chunk := conn.recv(1 << 16):
            now = time.monotonic()
            if self.first is None:
                self.first = now
            self.last = now
            self.received += len(chunk)
        self.done.set()

    def mbps(self) -> float:
        assert self.first is not None and self.last is not None and self.last > self.first
        return self.received * 8 / (self.last - self.first) / 1e6

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def host_server(ip: str, port: int, sink: bool = False) -> Iterator[HostServer]:
    srv = HostServer(ip, port, sink)
    try:
        yield srv
    finally:
        srv.close()


def talk(ip: str, port: int, timeout: float = 3.0) -> str | None:
    """Say "ping" to ip:port from the host; the answer, or None when unreachable."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"ping\n")
            data = b""
            while chunk := s.recv(256):
                data += chunk
            return data.decode().strip()
    except OSError:
        return None


def send_into(ip: str, port: int, nbytes: int) -> float:
    """Mbit/s of one TCP stream of ``nbytes`` from the host to ip:port, timed from the
    connect to the receiver's close (so what still sits in buffers is counted)."""
    with socket.create_connection((ip, port), timeout=10) as s:
        s.settimeout(60)
        start = time.monotonic()
        buf = b"x" * (1 << 16)
        left = nbytes
        while left > 0:
            s.sendall(buf[: min(left, len(buf))])
            left -= min(left, len(buf))
        s.shutdown(socket.SHUT_WR)
        # The container's nc closes once it has read everything.
        assert s.recv(1) == b""
        return nbytes * 8 / (time.monotonic() - start) / 1e6


def _lines(*argv: str) -> list[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()


def our_links(d: Daemon, extra_names: set[str]) -> list[str]:
    """Host links of this daemon: enslaved to its bridge, tagged with it, or named after
    one of its containers."""
    marker = f'"br":"{d.bridge}"'
    found = []
    for line in _lines("ip", "-d", "-o", "link"):
        name = line.split(":")[1].strip().split("@")[0]
        if f"master {d.bridge} " in line or marker in line or name in extra_names:
            found.append(name)
    return sorted(found)


def our_qdiscs(d: Daemon, names: set[str]) -> list[str]:
    wanted = names | {d.bridge}
    return sorted(
        line for line in _lines("tc", "qdisc", "show") if len(line.split()) > 4
        and line.split()[4] in wanted
    )  # fmt: skip


def our_ruleset(d: Daemon) -> str:
    return "".join(
        subprocess.run(
            ["nft", "list", "table", family, d.nft_table], capture_output=True, text=True
        ).stdout
        for family in ("inet", "bridge")
    )


def forward_map(d: Daemon) -> str:
    return subprocess.run(
        ["nft", "list", "map", "inet", d.nft_table, "tcp_forwards"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def has_forward(d: Daemon, host_port: int) -> bool:
    return re.search(rf"\b{host_port} : ", forward_map(d)) is not None


# ------------------------------------------------------------------ container side


async def start_echo(c: ApiClient, ref: str, port: int) -> None:
    """Run the echo service on ``port`` in the container, in the background."""
    await c.sh(ref, f"printf '%s' '{ECHO_SH}' > /tmp/echo.sh && chmod +x /tmp/echo.sh")
    await c.sh(ref, f"nc -ll -p {port} -e /tmp/echo.sh </dev/null >/dev/null 2>&1 &")
    await listening(c, ref, port)


async def listening(c: ApiClient, ref: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while f":{port} " not in await c.sh(ref, "netstat -ltn"):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {port} in {ref}")


async def nc_from(c: ApiClient, ref: str, ip: str, port: int, wait: int = 3) -> str | None:
    """The answer to "ping" from ip:port, sent from inside container ``ref``; None if the
    connection fails."""
    r = (await c.exec(ref, f"echo ping | nc -w {wait} {ip} {port}")).expect(200)
    return str(r["stdout"]).strip() if r["exit_code"] == 0 and r["stdout"] else None


async def ping_from(c: ApiClient, ref: str, ip: str) -> bool:
    r = (await c.exec(ref, f"ping -c 1 -W 2 {ip}")).expect(200)
    return bool(r["exit_code"] == 0)


# ------------------------------------------------------------------ tests


async def test_container_reaches_only_the_allowed_gateway_port(daemon: Daemon) -> None:
    tok = daemon.token(unique("gw"))
    gw = gateway(daemon)
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("gw")
        refs.append(name)
        await c.create_running(name)
        with host_server(gw, GW_PORT) as allowed, host_server(gw, CLOSED_PORT) as closed:
            assert await nc_from(c, name, gw, GW_PORT) == "pong:ping"
            assert allowed.accepted == 1
            assert await nc_from(c, name, gw, CLOSED_PORT, wait=2) is None
            assert closed.accepted == 0, "a host port that is not allowed was reached"


async def test_host_reaches_a_container_server(daemon: Daemon) -> None:
    tok = daemon.token(unique("h2c"))
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("srv")
        refs.append(name)
        ip = (await c.create_running(name))["ip_address"]
        assert ip and ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(daemon.subnet)
        await start_echo(c, name, 7000)
        assert talk(ip, 7000) == "pong:ping"


async def test_one_users_containers_talk_other_users_do_not(daemon: Daemon) -> None:
    alice, bob = daemon.token(unique("alice")), daemon.token(unique("bob"))
    async with (
        ApiClient(daemon, alice) as a,
        ApiClient(daemon, bob) as b,
        cleaning(a) as a_refs,
        cleaning(b) as b_refs,
    ):
        a1, a2, b1 = unique("a1"), unique("a2"), unique("b1")
        a_refs.extend([a1, a2])
        b_refs.append(b1)
        ip_a1 = (await a.create_running(a1))["ip_address"]
        await a.create_running(a2)
        ip_b1 = (await b.create_running(b1))["ip_address"]
        await start_echo(a, a1, 7000)
        await start_echo(b, b1, 7000)
        assert await nc_from(a, a2, ip_a1, 7000) == "pong:ping"
        assert await ping_from(a, a2, ip_a1)
        assert await nc_from(b, b1, ip_a1, 7000, wait=2) is None
        assert not await ping_from(b, b1, ip_a1)
        assert await nc_from(a, a2, ip_b1, 7000, wait=2) is None
        assert not await ping_from(a, a1, ip_b1)


async def test_network_mode_none_has_only_loopback(daemon: Daemon) -> None:
    tok = daemon.token(unique("none"))
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("none")
        refs.append(name)
        c_json = await c.create_running(name, network_mode="none")
        assert c_json["ip_address"] is None
        out = await c.sh(name, "ip -o link")
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        assert names == ["lo"], out
        r = (await c.post(f"/api/containers/{name}/port-forwards", {"container_port": 80})).expect(
            409
        )
        assert r["code"] == "no_network"


async def test_shaped_transfer_in_and_out_at_tier_rate(daemon: Daemon) -> None:
    tok = daemon.token(unique("shaped"), tier="pro")
    gw = gateway(daemon)
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name = unique("shaped")
        refs.append(name)
        c_json = await c.create_running(name)
        assert c_json["resources"]["network_mbps"] == SHAPED_MBPS
        ip = c_json["ip_address"]

        # stdin held open by sleep: nc would otherwise half-close at once, and the host
        # would see EOF before its send buffer has drained into the container.
        await c.sh(name, "sleep 600 2>/dev/null | nc -l -p 7001 >/dev/null 2>&1 &")
        await listening(c, name, 7001)
        into = send_into(ip, 7001, TRANSFER_BYTES)

        with host_server(gw, SINK_PORT, sink=True) as sink:
            count = TRANSFER_BYTES // 10_000
            r = await c.exec(
                name,
                f"dd if=/dev/zero bs=10000 count={count} 2>/dev/null | nc -w 5 {gw} {SINK_PORT}",
                timeout_seconds=120,
            )
            r.expect(200)
            assert r["exit_code"] == 0, r.body
            assert sink.done.wait(30)
            assert sink.received == TRANSFER_BYTES
            out = sink.mbps()
        print(f"\nshaped at {SHAPED_MBPS} Mbit/s: into {into:.2f}, out of {out:.2f} Mbit/s")
        for what, got in (("into", into), ("out of", out)):
            assert abs(got - SHAPED_MBPS) <= TOLERANCE * SHAPED_MBPS, (
                f"{what} the container: {got:.2f} Mbit/s"
            )


async def test_port_forward_reaches_the_container_and_goes_away(daemon: Daemon) -> None:
    tok = daemon.token(unique("pf"))
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        name, other = unique("pf"), unique("pf2")
        refs.extend([name, other])
        await c.create_running(name)
        await c.create_running(other)
        await start_echo(c, name, 8080)
        base = f"/api/containers/{name}/port-forwards"
        fwd = (await c.post(base, {"container_port": 8080})).expect(201).body
        port = fwd["host_port"]
        assert fwd["host"] == "127.0.0.1" and 20000 <= port <= 29999
        assert talk("127.0.0.1", port) == "pong:ping"
        listed = (await c.get(base)).expect(200).body
        assert listed == {"port_forwards": [fwd], "count": 1}
        # One host port is one forward.
        r = await c.post(
            f"/api/containers/{other}/port-forwards", {"container_port": 80, "host_port": port}
        )
        r.expect(409)
        assert r["error"] == f"host port {port}/tcp is already in use"
        assert db_rows(daemon, "SELECT host_port FROM port_forwards WHERE id = ?", fwd["id"])

        (await c.delete(f"{base}/{fwd['id']}")).expect(200)
        assert not has_forward(daemon, port)
        assert talk("127.0.0.1", port, timeout=1) is None
        assert (await c.get(base)).expect(200)["count"] == 0
        (await c.delete(f"{base}/{fwd['id']}")).expect(404)

        # A stop ends the container's forwards; a start does not bring them back.
        fwd = (await c.post(base, {"container_port": 8080})).expect(201).body
        (await c.post(f"/api/containers/{name}/stop")).expect(200)
        assert not has_forward(daemon, fwd["host_port"])
        assert (await c.get(base)).expect(200)["count"] == 0
        (await c.post(base, {"container_port": 8080})).expect(409)
        (await c.post(f"/api/containers/{name}/start")).expect(200)
        assert (await c.get(base)).expect(200)["count"] == 0


async def test_no_leftovers_after_many_cycles(daemon: Daemon) -> None:
    tok = daemon.token(unique("cyc"))
    async with ApiClient(daemon, tok) as c:
        links0 = our_links(daemon, set())
        rules0 = our_ruleset(daemon)
        qdiscs0 = our_qdiscs(daemon, set(links0))
        made: list[dict[str, Any]] = []
        async with cleaning(c) as refs:
            for i in range(CYCLES):
                name = unique(f"cyc{i}")
                refs.append(name)
                made.append(await c.create_running(name, disk_mb=16))
                fwd = await c.post(f"/api/containers/{name}/port-forwards", {"container_port": 80})
                fwd.expect(201)
                if i == 0:
                    # The probes below must see a container's objects, or an empty
                    # "after" would prove nothing.
                    mine = {host_ifname(daemon.bridge, made[0]["id"])}
                    mine.add(ifb_ifname(daemon.bridge, made[0]["id"]))
                    assert mine <= set(our_links(daemon, set()))
                    assert len(our_qdiscs(daemon, mine)) >= 3  # tbf, ingress, IFB tbf
                    assert has_forward(daemon, fwd["host_port"])
                    assert our_ruleset(daemon) != rules0
                (await c.delete(f"/api/containers/{name}?volumes=true")).expect(200)
        names = {host_ifname(daemon.bridge, m["id"]) for m in made} | {
            ifb_ifname(daemon.bridge, m["id"]) for m in made
        }
        assert our_links(daemon, names) == links0
        assert our_qdiscs(daemon, names | set(links0)) == qdiscs0
        assert our_ruleset(daemon) == rules0
        for m in made:
            assert leftovers(daemon, m) == {}, m["name"]
        ids = [m["db_id"] for m in made]
        marks = ",".join("?" * len(ids))
        assert (
            db_rows(
                daemon, f"SELECT id FROM port_forwards WHERE container_db_id IN ({marks})", *ids
            )
            == []
        )


async def test_restart_keeps_addresses_and_forwards(daemon: Daemon) -> None:
    tok = daemon.token(unique("rst"))
    name = unique("rst")
    try:
        async with ApiClient(daemon, tok) as c:
            before = await c.create_running(name)
            await start_echo(c, name, 8080)
            base = f"/api/containers/{name}/port-forwards"
            fwd = (await c.post(base, {"container_port": 8080})).expect(201).body
            assert talk("127.0.0.1", fwd["host_port"]) == "pong:ping"
        for kill in (False, True):
            daemon.restart(kill=kill)
            async with ApiClient(daemon, tok) as c:
                now = await c.container(name)
                assert now["status"] == "running", now
                assert now["ip_address"] == before["ip_address"]
                assert (await c.get(base)).expect(200).body == {"port_forwards": [fwd], "count": 1}
                assert has_forward(daemon, fwd["host_port"])
                assert talk("127.0.0.1", fwd["host_port"]) == "pong:ping"
        async with ApiClient(daemon, tok) as c:
            (await c.post(f"/api/containers/{name}/stop")).expect(200)
            assert not has_forward(daemon, fwd["host_port"])
            assert (await c.get(base)).expect(200)["count"] == 0
    finally:
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.start()
        async with ApiClient(daemon, tok) as c:
            await c.remove(name)
