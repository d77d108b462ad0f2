"""Integration: attach/detach cycles, reconcile and teardown leave nothing behind."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Iterator

import pytest

from rexecd.errors import NotFound
from rexecd.runtime.network import Network, PortForwarder, host_ifname, ifb_ifname

from .network_env import (
    Env,
    force_cleanup,
    network_env,
    our_links,
    our_ruleset,
    rand_hex,
    unique_config,
)


@pytest.fixture
def env() -> Iterator[Env]:
    with network_env() as e:
        yield e


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _bridge_qdiscs(env: Env) -> str:
    return subprocess.run(
        ["tc", "qdisc", "show", "dev", env.cfg.bridge], capture_output=True, text=True
    ).stdout


def test_fifty_cycles_leave_nothing(env: Env) -> None:
    c = env.sleeper()
    links, rules, qdiscs = our_links(env.cfg), our_ruleset(env.cfg), _bridge_qdiscs(env)
    fds = len(os.listdir("/proc/self/fd"))
    attach_ms, detach_ms = [], []
    for i in range(50):
        mbps = 10 if i % 2 else None
        group = "g" if i % 3 == 0 else None
        t0 = time.perf_counter()
        env.net.attach(f"cycle-{i}", c.pid, env.ip(2 + i), mbps, group=group)
        t1 = time.perf_counter()
        env.net.detach(f"cycle-{i}")
        t2 = time.perf_counter()
        attach_ms.append((t1 - t0) * 1000)
        detach_ms.append((t2 - t1) * 1000)
    print(
        f"\nattach median {statistics.median(attach_ms):.1f} ms"
        f" (max {max(attach_ms):.1f}); detach median {statistics.median(detach_ms):.1f} ms"
        f" (max {max(detach_ms):.1f})"
    )
    assert our_links(env.cfg) == links
    assert our_ruleset(env.cfg) == rules
    assert _bridge_qdiscs(env) == qdiscs
    assert c.link_names() == ["lo"]
    assert len(os.listdir("/proc/self/fd")) == fds, "file descriptors leaked"
    shown = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for i in range(50):
        for name in (
            host_ifname(env.cfg.bridge, f"cycle-{i}"),
            ifb_ifname(env.cfg.bridge, f"cycle-{i}"),
        ):
            assert f" {name}:" not in shown and f" {name}@" not in shown


def test_detach_is_idempotent_and_survives_a_dead_netns(env: Env) -> None:
    c = env.sleeper()
    fwd = PortForwarder(env.cfg)
    env.net.attach("dies", c.pid, env.ip(2), 10, group="g")
    fwd.add(40000 + int(rand_hex(3), 16) % 20000, env.ip(2), 80)
    c.kill()
    # The pair died with the netns; the IFB and the nft elements are still ours to clean.
    deadline = time.monotonic() + 5
    while _link_exists(host_ifname(env.cfg.bridge, "dies")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _link_exists(ifb_ifname(env.cfg.bridge, "dies"))
    env.net.detach("dies")
    env.net.detach("dies")
    assert not _link_exists(ifb_ifname(env.cfg.bridge, "dies"))
    state = env.net.firewall.state()
    assert not state.ports and not state.names and not state.groups and not state.forwards
    with pytest.raises(NotFound):
        env.net.set_bandwidth("dies", 5)


def test_reconcile_removes_orphans_only_on_our_bridge(env: Env) -> None:
    other_cfg = unique_config()
    other = Network(other_cfg)
    stray = "rx" + rand_hex(11)
    try:
        other.setup_host()
        live, orphan, dead, foreign = (env.sleeper() for _ in range(4))
        env.net.attach("live", live.pid, env.ip(2), 10, group="g")
        env.net.attach("orphan", orphan.pid, env.ip(3), 10, group="h")
        env.net.attach("dead", dead.pid, env.ip(4), 10)
        other.attach("orphan", foreign.pid, str(other.ipam.gateway + 1), 10)
        # A link with our name pattern that is on no bridge at all: not ours to judge.
        made = subprocess.run(
            ["ip", "link", "add", stray, "type", "veth", "peer", "name", stray + "p"],
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, made.stderr
        dead.kill()
        removed = env.net.reconcile({"live"})
        print(f"\nreconcile removed: {removed}")
        assert host_ifname(env.cfg.bridge, "orphan") in removed
        assert ifb_ifname(env.cfg.bridge, "orphan") in removed
        assert ifb_ifname(env.cfg.bridge, "dead") in removed
        assert any(r.startswith("nft port") for r in removed)
        assert "nft group 2" in removed
        assert [a.container_id for a in env.net.attachments()] == ["live"]
        assert _link_exists(host_ifname(env.cfg.bridge, "live"))
        assert _link_exists(ifb_ifname(env.cfg.bridge, "live"))
        # The other daemon's container of the same id and the stray link are untouched.
        assert [a.container_id for a in other.attachments()] == ["orphan"]
        assert _link_exists(ifb_ifname(other_cfg.bridge, "orphan"))
        assert _link_exists(stray)
        state = env.net.firewall.state()
        assert {p.ip for p in state.ports} == {env.ip(2)}
        assert state.groups == {1}
        assert env.net.reconcile({"live"}) == []
    finally:
        subprocess.run(["ip", "link", "del", stray], capture_output=True)
        try:
            other.teardown_host()
        finally:
            force_cleanup(other_cfg)


def test_teardown_removes_everything_and_is_idempotent(env: Env) -> None:
    c = env.sleeper()
    env.net.attach("t", c.pid, env.ip(2), 10, group="g")
    env.net.teardown_host()
    env.net.teardown_host()
    assert not _link_exists(env.cfg.bridge)
    assert our_links(env.cfg) == []
    assert our_ruleset(env.cfg) == ""
    assert c.link_names() == ["lo"]
