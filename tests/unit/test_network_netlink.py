"""``Network``'s netlink requests, recorded through ``FakeNetlink`` (no root needed).

The integration tests check the same attach, shaping and rollback on a real kernel;
these pin the exact requests (which namespace, which link, which flags and tc
parameters) and that a failed attach leaves nothing behind.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Any

import pytest

from rexecd.errors import Conflict, RuntimeFailure
from rexecd.runtime.network import Network, NetworkConfig
from rexecd.runtime.network.bridge import ensure_bridge
from rexecd.runtime.network.firewall import Port
from rexecd.runtime.network.naming import LinkTag, container_mac, host_ifname, ifb_ifname
from rexecd.runtime.network.netlink import NetlinkError
from tests.unit.fakes.netlink import Call, FakeFirewall, FakeNetlink

BRIDGE = "rxt0"
CID = "c0ffee00c0ffee00"
PID = 4242
IP = "10.77.0.5"
GW = "10.77.0.1"
INGRESS = 0xFFFF0000


def _network() -> tuple[Network, FakeNetlink, FakeFirewall, int]:
    nl = FakeNetlink()
    br = nl.host_ns.add_link(BRIDGE, "bridge")
    net = Network(NetworkConfig(bridge=BRIDGE, subnet="10.77.0.0/16"), netlink=nl)
    fw = FakeFirewall()
    net.firewall = fw  # type: ignore[assignment]
    return net, nl, fw, br


def _host() -> str:
    return host_ifname(BRIDGE, CID)


def _ifb() -> str:
    return ifb_ifname(BRIDGE, CID)


def _veth_calls(br: int, group: int = 0, tag_group: str | None = None) -> list[Call]:
    """The requests of an attach up to (not including) shaping and bringing it up."""
    idx = 3  # host: lo 1, the bridge 2; the netns: lo 1, eth0 2
    ns = f"netns:{PID}"
    return [
        Call(
            "host",
            "add_veth",
            {
                "name": _host(),
                "master": br,
                "group": group,
                "peer": "eth0",
                "peer_netns_fd": 1000 + PID,
                "peer_mac": container_mac(BRIDGE, CID),
            },
        ),
        Call(
            "host",
            "set_link",
            {"index": idx, "alias": LinkTag(BRIDGE, CID, IP, tag_group).encode(), "up": False},
        ),
        Call("host", "set_isolated", {"index": idx, "isolated": tag_group is None}),
        Call(ns, "set_link", {"index": 1, "alias": None, "up": True}),
        Call(ns, "add_addr", {"index": 2, "address": IP, "prefixlen": 16}),
        Call(ns, "set_link", {"index": 2, "alias": None, "up": True}),
        Call(ns, "add_default_route", {"gateway": GW, "oif": 2}),
    ]


def test_attach_creates_the_pair_in_place_addresses_it_and_brings_it_up_last() -> None:
    net, nl, fw, br = _network()
    att = net.attach(CID, PID, IP, None)
    assert nl.calls == [
        *_veth_calls(br),
        Call("host", "set_link", {"index": 3, "alias": None, "up": True}),
    ]
    assert fw.calls == [("add_port", (Port(_host(), container_mac(BRIDGE, CID), IP), 0))]
    eth0 = nl.container(PID).by_name("eth0")
    assert eth0 is not None and eth0.mac == att.mac
    assert nl.container(PID).routes == [("0.0.0.0/0", GW, 2)]
    host = nl.host_ns.by_name(_host())
    assert host is not None and host.up and host.isolated and host.master == br
    assert nl.sessions_open == 0


def test_a_group_shares_one_device_group_and_is_not_isolated() -> None:
    net, nl, _, br = _network()
    net.attach(CID, PID, IP, None, group="alice")
    assert nl.calls[:7] == _veth_calls(br, group=1, tag_group="alice")
    net.attach("0123456789abcdef", PID + 1, "10.77.0.6", None, group="alice")
    net.attach("fedcba9876543210", PID + 2, "10.77.0.7", None, group="bob")
    groups = [c.args["group"] for c in nl.calls if c.name == "add_veth"]
    assert groups == [1, 1, 2]


def _shaping_calls(veth: int, ifb: int, mbps: int, burst: int, alias: str) -> list[Call]:
    tbf = {"handle": 0x10000, "rate": f"{mbps}mbit", "burst": burst, "latency": "50ms"}
    return [
        Call("host", "replace_tbf", {"index": veth, **tbf}),
        Call("host", "add_ifb", {"name": _ifb()}),
        Call("host", "set_link", {"index": ifb, "alias": alias, "up": True}),
        Call("host", "replace_tbf", {"index": ifb, **tbf}),
        # A fresh IFB: any old redirect points at a dead ifindex, so it is rebuilt.
        Call("host", "del_qdisc", {"index": veth, "parent": 0xFFFFFFF1}),
        Call("host", "add_ingress", {"index": veth, "handle": INGRESS}),
        Call(
            "host",
            "redirect_all",
            {
                "index": veth,
                "parent": INGRESS,
                "prio": 1,
                "protocol": 0x0003,
                "classid": 0x10001,
                "to_index": ifb,
            },
        ),
    ]


def test_bandwidth_shapes_both_ways_with_tbf_and_an_ifb_redirect() -> None:
    net, nl, _, br = _network()
    net.attach(CID, PID, IP, 100)
    alias = LinkTag(BRIDGE, CID, IP, None).encode()
    # 100 Mbit/s: 10 ms of burst is 125000 bytes.
    assert nl.calls == [
        *_veth_calls(br),
        *_shaping_calls(veth=3, ifb=4, mbps=100, burst=125_000, alias=alias),
        Call("host", "set_link", {"index": 3, "alias": None, "up": True}),
    ]
    assert nl.host_ns.filters == [
        {
            "index": 3,
            "parent": INGRESS,
            "prio": 1,
            "protocol": 3,
            "classid": 0x10001,
            "to_index": 4,
        }
    ]
    assert [a.mbps for a in net.attachments()] == [100]


def test_a_low_rate_still_bursts_one_full_frame() -> None:
    net, nl, _, _ = _network()
    net.attach(CID, PID, IP, 1)
    bursts = {c.args["burst"] for c in nl.calls if c.name == "replace_tbf"}
    assert bursts == {16_384}


def test_changing_the_rate_keeps_the_ifb_and_its_redirect() -> None:
    net, nl, _, _ = _network()
    net.attach(CID, PID, IP, 100)
    nl.calls.clear()
    net.set_bandwidth(CID, 20)
    tbf = {"handle": 0x10000, "rate": "20mbit", "burst": 25_000, "latency": "50ms"}
    assert nl.calls == [
        Call("host", "replace_tbf", {"index": 3, **tbf}),
        Call("host", "replace_tbf", {"index": 4, **tbf}),
    ]


def test_removing_the_limit_drops_both_qdiscs_and_the_ifb() -> None:
    net, nl, _, _ = _network()
    net.attach(CID, PID, IP, 100)
    nl.calls.clear()
    net.set_bandwidth(CID, None)
    assert nl.calls == [
        Call("host", "del_qdisc", {"index": 3, "parent": 0xFFFFFFF1}),
        Call("host", "del_qdisc", {"index": 3, "parent": 0xFFFFFFFF}),
        Call("host", "del_link", {"index": 4}),
    ]
    assert _ifb() not in nl.host_ns.names()
    assert [a.mbps for a in net.attachments()] == [None]


def _assert_nothing_left(nl: FakeNetlink, fw: FakeFirewall) -> None:
    assert nl.host_ns.names() == {"lo", BRIDGE}
    assert nl.container(PID).names() == {"lo"}, "the peer dies with the host end"
    assert fw.ports == {}
    assert nl.sessions_open == 0


def _fails_at(name: str, ns: str = "host") -> Any:
    return lambda c: c.name == name and c.ns == ns


@pytest.mark.parametrize(
    ("where", "ns", "step"),
    [
        ("set_isolated", "host", "veth tag"),
        ("add_addr", f"netns:{PID}", "netns eth0"),
        ("add_default_route", f"netns:{PID}", "netns route"),
        ("redirect_all", "host", "tc ingress"),
        ("set_link", "host", "veth up"),
    ],
)
def test_a_failed_attach_leaves_no_link_ifb_or_firewall_element(
    where: str, ns: str, step: str
) -> None:
    net, nl, fw, _ = _network()
    when = _fails_at(where, ns)
    if where == "set_link":  # the last one: bringing the host end up

        def when(c: Call) -> bool:
            return c.name == "set_link" and c.ns == "host" and c.args["up"] and c.args["index"] == 3

    nl.fail(when, NetlinkError(errno.EPERM, "Operation not permitted"))
    with pytest.raises(RuntimeFailure) as caught:
        net.attach(CID, PID, IP, 100)
    assert caught.value.step == step
    _assert_nothing_left(nl, fw)
    deleted = [c.args["index"] for c in nl.calls if c.name == "del_link"]
    # Undone last-in first-out: the IFB made for shaping (4) before the veth (3).
    assert deleted == ([4, 3] if where in ("redirect_all", "set_link") else [3])


def test_a_firewall_failure_rolls_the_links_back_too() -> None:
    net, nl, fw, _ = _network()
    fw.fail_add = RuntimeFailure("nft add port", "nft failed")
    with pytest.raises(RuntimeFailure):
        net.attach(CID, PID, IP, 100)
    _assert_nothing_left(nl, fw)


def test_attach_refuses_a_second_attach_without_touching_the_first() -> None:
    net, nl, _, _ = _network()
    net.attach(CID, PID, IP, None)
    before = list(nl.calls)
    with pytest.raises(Conflict, match="already attached"):
        net.attach(CID, PID, IP, None)
    assert nl.calls == before
    assert _host() in nl.host_ns.names()


def test_detach_deletes_the_pair_the_ifb_and_the_port_elements() -> None:
    net, nl, fw, _ = _network()
    net.attach(CID, PID, IP, 100)
    nl.calls.clear()
    net.detach(CID)
    assert [(c.name, c.args) for c in nl.calls] == [
        ("del_link", {"index": 3}),
        ("del_link", {"index": 4}),
    ]
    assert nl.host_ns.names() == {"lo", BRIDGE}
    assert fw.ports == {}


def test_reconcile_removes_only_our_stale_links() -> None:
    net, nl, fw, br = _network()
    net.attach(CID, PID, IP, 100)
    other = nl.host_ns.add_link("rx0123456789", "veth", master=None)
    foreign = nl.host_ns.add_link("vethabc", "veth", master=br)
    removed = net.reconcile(set())
    assert removed[:2] == [_host(), _ifb()]
    assert other in nl.host_ns.table and foreign in nl.host_ns.table
    assert _host() not in nl.host_ns.names() and _ifb() not in nl.host_ns.names()
    assert fw.ports == {}
    assert "nft port " + _host() in removed


def test_ensure_bridge_adds_it_once_then_only_brings_it_up() -> None:
    nl = FakeNetlink()
    gw = ipaddress.IPv4Interface("10.77.0.1/16")
    with nl.host() as s:
        idx = ensure_bridge(s, BRIDGE, gw, "02:00:00:00:00:01")
        ensure_bridge(s, BRIDGE, gw, "02:00:00:00:00:01")
    assert nl.calls == [
        Call("host", "add_bridge", {"name": BRIDGE, "mac": "02:00:00:00:00:01"}),
        Call("host", "add_addr", {"index": idx, "address": "10.77.0.1", "prefixlen": 16}),
        Call("host", "set_link", {"index": idx, "alias": None, "up": True}),
        Call("host", "set_link", {"index": idx, "alias": None, "up": True}),
    ]
