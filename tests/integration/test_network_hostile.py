"""Integration: a container root with CAP_NET_RAW (Docker's default set; a packet socket
works in a default rexecd container) forging frames on the bridge, and a container
filling the host's connection tracking table.

Each test stands a throwaway netns on the test's own bridge in for the container and
writes raw Ethernet frames from it. What it must not do: move a neighbour's MAC to its
own port through a frame the bridge learns from outside the nft prerouting hook (the
IEEE link-local group addresses), teach the host a neighbour's MAC for its own address
with a forged ARP sender, or reach a link-local service (a cloud metadata endpoint)
that the host can route to, or hold more than its share of the host's conntrack table
(one for every container and the host: when it is full, new connections of everyone
are dropped). All frames stay on the test's bridge; the "metadata service" and the
"internet" live in namespaces the test makes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from rexecd.runtime.network.firewall import Port, firewall_for

from .network_env import PY, Env, Sleeper, network_env, unique_config, wait_ready

# Writes argv[2:] frames of "dst src type payload" hex from eth0, three times each.
INJECT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for frame in sys.argv[1:]:
    for _ in range(3):
        s.send(bytes.fromhex(frame))
"""

LLDP = "88cc"
ARP = "0806"


@pytest.fixture
def env() -> Iterator[Env]:
    with network_env() as e:
        yield e


def mac_hex(mac: str) -> str:
    return mac.replace(":", "")


def ip_hex(ip: str) -> str:
    return "".join(f"{int(part):02x}" for part in ip.split("."))


def inject(where: Sleeper, *frames: str) -> None:
    out = where.run(PY, "-c", INJECT, *frames)
    assert out.returncode == 0, out.stderr


def fdb_port(bridge: str, mac: str) -> str | None:
    """The bridge port the bridge's forwarding database sends ``mac`` to."""
    out = subprocess.run(
        ["bridge", "fdb", "show", "br", bridge], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == mac and "dev" in fields:
            return fields[fields.index("dev") + 1]
    return None


@pytest.mark.parametrize("group", ["0e", "02", "03"])
def test_link_local_frame_cannot_take_a_neighbours_mac(env: Env, group: str) -> None:
    """The bridge learns source MACs of frames sent to 01:80:c2:00:00:0X before (LLDP,
    0x0e) or without passing the nft prerouting hook that checks them; a forged one
    would move a neighbour's MAC to the attacker's port and its traffic with it."""
    attacker, victim = env.sleeper(), env.sleeper()
    env.net.attach("lla", attacker.pid, env.ip(2), None, group="alice")
    vic = env.net.attach("llv", victim.pid, env.ip(3), None, group="bob")
    assert vic.mac
    env.server(victim, "0.0.0.0", 7000)
    assert env.probe(None, env.ip(3), 7000), "host -> victim before the forged frame"
    assert fdb_port(env.cfg.bridge, vic.mac) == vic.host_ifname
    frame = f"0180c20000{group}{mac_hex(vic.mac)}{LLDP}" + "00" * 46
    inject(attacker, frame)
    # Once more through the bridge: the frames above were processed by the time the
    # host's own connection goes out.
    assert env.probe(None, env.ip(3), 7000), "host -> victim went to the attacker's port"
    assert fdb_port(env.cfg.bridge, vic.mac) == vic.host_ifname


def test_arp_sender_mac_must_be_the_ports_own(env: Env) -> None:
    """An ARP request for the gateway whose Ethernet source and sender IP are the
    attacker's own but whose sender MAC is a neighbour's: the host would send the
    attacker's traffic (its downloads, its port forwards) to the neighbour's port."""
    attacker, victim = env.sleeper(), env.sleeper()
    att = env.net.attach("arpa", attacker.pid, env.ip(2), None, group="alice")
    vic = env.net.attach("arpv", victim.pid, env.ip(3), None, group="bob")
    assert att.mac and vic.mac
    env.server(attacker, "0.0.0.0", 7000)
    # No entry for the attacker yet: a request to one of the host's addresses creates it
    # from the sender fields (an existing one is only replaced after its locktime).
    subprocess.run(["ip", "neigh", "flush", "dev", env.cfg.bridge], check=True)
    arp = (
        "0001" + "0800" + "06" + "04" + "0001"
        + mac_hex(vic.mac) + ip_hex(env.ip(2))
        + "00" * 6 + ip_hex(env.net.gateway())
    )  # fmt: skip
    inject(attacker, "ff" * 6 + mac_hex(att.mac) + ARP + arp + "00" * 18)
    assert env.probe(None, env.ip(2), 7000), "host -> attacker went to the victim's port"
    neigh = subprocess.run(
        ["ip", "neigh", "show", env.ip(2), "dev", env.cfg.bridge],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert vic.mac not in neigh, neigh


@contextlib.contextmanager
def routed_namespace(env: Env, addr: str) -> Iterator[Sleeper]:
    """A namespace of the test's own holding ``addr``, routed from the host through a
    veth: a service beyond the host, as far as a container can tell."""
    ns = env.sleeper()
    host_if, peer_if = f"rtm{secrets.token_hex(4)}", f"rtp{secrets.token_hex(4)}"
    subprocess.run(
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
         "netns", str(ns.pid)],
        check=True,
    )  # fmt: skip
    try:
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        subprocess.run(["ip", "route", "add", f"{addr}/32", "dev", host_if], check=True)
        for argv in (
            ("ip", "addr", "add", f"{addr}/32", "dev", peer_if),
            ("ip", "link", "set", peer_if, "up"),
            ("ip", "route", "add", "default", "dev", peer_if),
        ):
            out = ns.run(*argv)
            assert out.returncode == 0, out.stderr
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


@contextlib.contextmanager
def link_local_service(env: Env) -> Iterator[str]:
    """An echo server on a random 169.254/16 address, routed from the host as a cloud
    VM routes its metadata endpoint."""
    addr = f"169.254.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    with routed_namespace(env, addr) as ns:
        env.server(ns, addr, 80)
        yield addr


def test_link_local_addresses_are_not_routed_for_containers(env: Env) -> None:
    """169.254.169.254 answers the host's cloud credentials on most clouds; a container
    must not reach it (nor any link-local address) through the host's routes."""
    c = env.sleeper()
    env.net.attach("md", c.pid, env.ip(2), None, group="alice")
    with link_local_service(env) as addr:
        assert env.probe(None, addr, 80), "the host reaches the service it routes"
        assert not env.probe(c, addr, 80), f"a container reached {addr} through the host"


# Answers every datagram; prints "ready" once bound.
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""

# Opens argv[3] UDP flows (one socket, so one source port, each) to argv[1]:argv[2],
# sends once on each and prints how many were answered (waiting up to argv[4] seconds
# from the last answer for the rest).
UDP_FLOWS = r"""
import select, socket, sys, time
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(int(sys.argv[3]))]
for s in socks:
    s.setblocking(False)
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
answered, wait = set(), float(sys.argv[4])
deadline = time.monotonic() + wait
while len(answered) < len(socks) and time.monotonic() < deadline:
    ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.2)
    for s in ready:
        s.recv(64)
        answered.add(s)
        deadline = time.monotonic() + wait
print(len(answered))
"""

FLOW_CAP = 64


def test_a_container_holds_at_most_its_share_of_host_flows() -> None:
    with network_env(max_flows=FLOW_CAP) as env:
        c = env.sleeper()
        env.net.attach("flows", c.pid, env.ip(2), None, group="alice")
        addr = f"192.0.2.{secrets.randbelow(250) + 1}"  # TEST-NET-1, routed to our netns
        with routed_namespace(env, addr) as outside:
            proc = outside.popen(PY, "-c", UDP_ECHO, addr, "5353")
            env.procs.append(proc)
            wait_ready(proc)
            out = c.run(PY, "-c", UDP_FLOWS, addr, "5353", str(FLOW_CAP * 4), "2")
            assert out.returncode == 0, out.stderr
            answered = int(out.stdout)
            # Its first flows work; past the cap, new ones are dropped at the host.
            assert FLOW_CAP // 2 <= answered <= FLOW_CAP, answered
            # Its address's count goes with it: the next container given it starts at
            # 0. Checked while the far end still routes: once its link is deleted the
            # kernel may drop the count by itself (4 runs in a row failed so, cause not
            # pinned down), and the
            # detach would then prove nothing.
            assert env.ip(2) in flow_elements(env)
            env.net.detach("flows")
            assert env.ip(2) not in flow_elements(env)


def flow_elements(env: Env) -> str:
    return subprocess.run(
        ["nft", "list", "set", "inet", env.cfg.nft_table, "flows"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_ports_of_tables_made_before_the_flow_cap_still_delete() -> None:
    """Tables an older rexecd installed have no flows set: removing a port there (a
    sweep, a detach before setup_host re-ran) must not fail on its flows element."""
    cfg = unique_config()
    fw = firewall_for(cfg)
    old = "".join(line + "\n" for line in fw.render().splitlines() if "flows" not in line)
    subprocess.run(["nft", "-f", "-"], input=old, text=True, check=True)
    try:
        ip = str(ipaddress.IPv4Network(cfg.subnet).network_address + 2)
        port = Port("rx0123456789a", "02:00:00:00:00:02", ip)
        fw.add_port(port, 0)
        fw.delete(ports=[port], names=[port.ifname])
        assert port not in fw.state().ports
    finally:
        fw.remove()
