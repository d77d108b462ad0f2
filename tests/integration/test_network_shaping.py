"""Integration: tbf + IFB shaping holds a container to its bandwidth in both directions."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from rexecd.runtime.network import ifb_ifname

from .network_env import Env, measure, network_env

SINK = 18090
TOLERANCE = 0.15


@pytest.fixture
def env() -> Iterator[Env]:
    with network_env(gateway_tcp_ports=(SINK,)) as e:
        yield e


def _within(measured: float, target: float) -> bool:
    return abs(measured - target) <= TOLERANCE * target


def test_shaped_both_ways_at_10_mbit(env: Env) -> None:
    c = env.sleeper()
    env.net.attach("shaped", c.pid, env.ip(2), 10)
    into = measure(receiver_at=c, sender_at=None, ip=env.ip(2), port=7001)
    out = measure(receiver_at=None, sender_at=c, ip=env.net.gateway(), port=SINK)
    print(f"\nshaped at 10 Mbit/s: into container {into:.2f}, out of container {out:.2f}")
    assert _within(into, 10), f"into container: {into:.2f} Mbit/s"
    assert _within(out, 10), f"out of container: {out:.2f} Mbit/s"


def test_live_change_and_removal(env: Env) -> None:
    c = env.sleeper()
    att = env.net.attach("live", c.pid, env.ip(2), 10)
    env.net.set_bandwidth("live", 20)
    into = measure(receiver_at=c, sender_at=None, ip=env.ip(2), port=7002, secs=2)
    print(f"\nafter set_bandwidth(20): into container {into:.2f}")
    assert _within(into, 20), f"{into:.2f} Mbit/s"
    assert [a.mbps for a in env.net.attachments()] == [20]
    ifb = ifb_ifname(env.cfg.bridge, "live")
    env.net.set_bandwidth("live", None)
    qdiscs = subprocess.run(
        ["tc", "qdisc", "show", "dev", att.host_ifname], capture_output=True, text=True
    ).stdout
    assert "tbf" not in qdiscs and "ingress" not in qdiscs
    shown = subprocess.run(["ip", "link", "show", ifb], capture_output=True, text=True)
    assert shown.returncode != 0, "IFB left behind"
    assert [a.mbps for a in env.net.attachments()] == [None]
    env.net.set_bandwidth("live", 5)
    assert [a.mbps for a in env.net.attachments()] == [5]
