"""Integration: containers on a real bridge reach what they should and nothing else."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from rexecd.errors import Conflict, InvalidRequest, RuntimeFailure
from rexecd.runtime.network import PortForwarder

from .network_env import Env, network_env, our_links

ALLOWED = 18080  # stands for a service we deliberately offer on the gateway
DAEMON = 18081  # stands for the daemon's own API port: must stay unreachable


@pytest.fixture
def env() -> Iterator[Env]:
    with network_env(gateway_tcp_ports=(ALLOWED,)) as e:
        yield e


def test_container_sees_lo_and_eth0_only(env: Env) -> None:
    c = env.sleeper()
    att = env.net.attach("c-links", c.pid, env.ip(2), None)
    assert c.link_names() == ["lo", "eth0"]
    addr = c.run("ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert f"{env.ip(2)}/24" in addr
    route = c.run("ip", "route", "show", "default").stdout
    assert f"via {env.net.gateway()} dev eth0" in route
    assert c.run("ip", "-o", "link", "show", "eth0").stdout.count(att.mac or "?") == 1
    assert len(att.host_ifname) <= 15


def test_host_and_container_talk_both_ways(env: Env) -> None:
    c = env.sleeper()
    env.net.attach("c-both", c.pid, env.ip(2), None)
    gw = env.net.gateway()
    env.server(c, "0.0.0.0", 7000)
    assert env.probe(None, env.ip(2), 7000), "host -> container"
    env.server(None, gw, ALLOWED)
    env.server(None, gw, DAEMON)
    assert env.probe(c, gw, ALLOWED), "container -> allowed gateway port"
    assert not env.probe(c, gw, DAEMON), "container reached a host port we did not allow"


def test_groups_decide_who_talks(env: Env) -> None:
    a, b, other, lone1, lone2 = (env.sleeper() for _ in range(5))
    env.net.attach("a", a.pid, env.ip(2), None, group="alice")
    env.net.attach("b", b.pid, env.ip(3), None, group="alice")
    env.net.attach("o", other.pid, env.ip(4), None, group="bob")
    env.net.attach("l1", lone1.pid, env.ip(5), None)
    env.net.attach("l2", lone2.pid, env.ip(6), None)
    for s in (a, b, other, lone1, lone2):
        env.server(s, "0.0.0.0", 7000)
    assert env.probe(a, env.ip(3), 7000), "same group"
    assert env.probe(b, env.ip(2), 7000), "same group, other way"
    assert not env.probe(a, env.ip(4), 7000), "different groups"
    assert not env.probe(other, env.ip(2), 7000), "different groups, other way"
    assert not env.probe(lone1, env.ip(6), 7000), "two ungrouped containers"
    assert not env.probe(a, env.ip(5), 7000), "grouped -> ungrouped"
    assert not env.probe(lone1, env.ip(2), 7000), "ungrouped -> grouped"
    # Everyone still reaches the host.
    assert all(env.probe(None, env.ip(n), 7000) for n in range(2, 7))


def test_hairpin_through_gateway_is_dropped(env: Env) -> None:
    a, b = env.sleeper(), env.sleeper()
    env.net.attach("hp-a", a.pid, env.ip(2), None)
    env.net.attach("hp-b", b.pid, env.ip(3), None)
    env.server(b, "0.0.0.0", 7000)
    # A container root can route its neighbour via the gateway; the host must not
    # forward that for it.
    out = a.run("ip", "route", "add", f"{env.ip(3)}/32", "via", env.net.gateway())
    assert out.returncode == 0, out.stderr
    assert not env.probe(a, env.ip(3), 7000)


def test_spoofed_source_is_dropped(env: Env) -> None:
    a = env.sleeper()
    env.net.attach("spoof", a.pid, env.ip(2), None)
    env.server(None, env.net.gateway(), ALLOWED)
    assert env.probe(a, env.net.gateway(), ALLOWED)
    # Take a neighbour's address: every frame from it is dropped on the bridge.
    a.run("ip", "addr", "flush", "dev", "eth0")
    a.run("ip", "addr", "add", f"{env.ip(9)}/24", "dev", "eth0")
    assert not env.probe(a, env.net.gateway(), ALLOWED)


def test_port_forward_from_host_loopback(env: Env) -> None:
    c = env.sleeper()
    env.net.attach("pf", c.pid, env.ip(2), None)
    env.server(c, "0.0.0.0", 7000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host_port = s.getsockname()[1]
    fwd = PortForwarder(env.cfg)
    fwd.add(host_port, env.ip(2), 7000)
    assert fwd.add(host_port, env.ip(2), 7000).host_port == host_port  # idempotent
    with pytest.raises(Conflict):
        fwd.add(host_port, env.ip(3), 7000)
    assert [(f.host_port, f.container_ip, f.container_port) for f in fwd.list()] == [
        (host_port, env.ip(2), 7000)
    ]
    assert env.probe(None, "127.0.0.1", host_port)
    assert not _bindable(host_port)  # held while the forward exists
    assert fwd.remove(host_port)
    assert not fwd.remove(host_port)
    assert not env.probe(None, "127.0.0.1", host_port)
    assert _bindable(host_port)
    # detach removes the container's forwards; the next listing frees their ports.
    fwd.add(host_port, env.ip(2), 7000)
    env.net.detach("pf")
    assert fwd.list() == []
    assert _bindable(host_port)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_attach_failure_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    c = env.sleeper()
    before = our_links(env.cfg)

    # Fail at the last step, with the veth, the IFB and the qdiscs already made.
    def refuse(*_: object) -> None:
        raise RuntimeFailure("nft add port", "refused by the test")

    monkeypatch.setattr(env.net.firewall, "add_port", refuse)
    with pytest.raises(RuntimeFailure, match="refused by the test"):
        env.net.attach("late", c.pid, env.ip(2), 10, group="g")
    monkeypatch.undo()
    assert our_links(env.cfg) == before
    assert c.link_names() == ["lo"]
    # An eth0 already in the netns makes the veth creation itself fail.
    made = c.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    assert made.returncode == 0, made.stderr
    with pytest.raises(RuntimeFailure) as info:
        env.net.attach("early", c.pid, env.ip(2), 10, group="g")
    assert info.value.step == "veth add"
    assert our_links(env.cfg) == before
    state = env.net.firewall.state()
    assert not state.ports and not state.names and not state.groups
    with pytest.raises(RuntimeFailure):
        env.net.attach("nopid", 2**22 + 12345, env.ip(3), None)
    assert our_links(env.cfg) == before


def test_attach_twice_conflicts_and_host_netns_is_refused(env: Env) -> None:
    c = env.sleeper()
    env.net.attach("twice", c.pid, env.ip(2), None)
    with pytest.raises(Conflict):
        env.net.attach("twice", c.pid, env.ip(3), None)
    other = env.sleeper()
    with pytest.raises(Conflict, match="in use"):
        env.net.attach("same-ip", other.pid, env.ip(2), None)
    assert other.link_names() == ["lo"]
    with pytest.raises(InvalidRequest, match="shares the daemon's network namespace"):
        env.net.attach("host", os.getpid(), env.ip(4), None)


def test_setup_host_is_idempotent_and_keeps_running_containers(env: Env) -> None:
    c = env.sleeper()
    env.net.attach("keep", c.pid, env.ip(2), None, group="g")
    before = env.net.firewall.state()
    env.net.setup_host()
    env.net.setup_host()
    after = env.net.firewall.state()
    assert before == after and after.ports
    env.server(c, "0.0.0.0", 7000)
    assert env.probe(None, env.ip(2), 7000)
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", env.cfg.bridge], capture_output=True, text=True
    ).stdout
    assert out.count("inet ") == 1


def test_nft_blocks_even_without_the_isolated_flag(env: Env) -> None:
    a, b = env.sleeper(), env.sleeper()
    att_a = env.net.attach("iso-a", a.pid, env.ip(2), None)
    att_b = env.net.attach("iso-b", b.pid, env.ip(3), None)
    env.server(b, "0.0.0.0", 7000)
    for att in (att_a, att_b):
        out = subprocess.run(
            [
                "ip",
                "link",
                "set",
                "dev",
                att.host_ifname,
                "type",
                "bridge_slave",
                "isolated",
                "off",
            ],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
    assert not env.probe(a, env.ip(3), 7000)
    assert env.probe(None, env.ip(3), 7000)
