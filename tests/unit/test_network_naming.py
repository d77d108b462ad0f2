"""Unit: link names, MACs and link tags are stable, short and collision-aware."""

from __future__ import annotations

import pytest

from rexecd.errors import InvalidRequest
from rexecd.runtime.network.naming import (
    LinkTag,
    bridge_mac,
    check_container_id,
    check_ifname,
    container_mac,
    host_ifname,
    ifb_ifname,
    is_our_name,
)


def test_names_are_short_stable_and_prefixed() -> None:
    cid = "f" * 64
    veth, ifb = host_ifname("rexec0", cid), ifb_ifname("rexec0", cid)
    assert len(veth) == len(ifb) == 13 <= 15
    assert veth.startswith("rx") and ifb.startswith("ri")
    assert veth[2:] == ifb[2:]
    assert host_ifname("rexec0", cid) == veth  # stable across calls
    assert is_our_name(veth) and is_our_name(ifb)
    assert not is_our_name("rexec0") and not is_our_name("rxZZZZZZZZZZZ")


def test_names_depend_on_bridge_and_id() -> None:
    assert host_ifname("rexec0", "a") != host_ifname("rexec0", "b")
    # Two daemons with one container id never fight over a host link name.
    assert host_ifname("rexec0", "a") != host_ifname("rexec1", "a")
    names = {host_ifname("rexec0", f"c{i}") for i in range(5000)}
    assert len(names) == 5000


def test_macs_are_unicast_locally_administered_and_stable() -> None:
    for mac in (container_mac("rexec0", "abc"), bridge_mac("rexec0")):
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01
        assert len(mac.split(":")) == 6
    assert container_mac("rexec0", "abc") == container_mac("rexec0", "abc")
    assert container_mac("rexec0", "abc") != container_mac("rexec0", "abd")


def test_link_tag_round_trip_and_foreign_aliases() -> None:
    tag = LinkTag("rexec0", "c1", "10.88.0.2", "alice")
    assert LinkTag.decode(tag.encode()) == tag
    plain = LinkTag("rexec0", "c1", "10.88.0.2")
    assert LinkTag.decode(plain.encode()) == plain
    assert LinkTag.decode(None) is None
    assert LinkTag.decode("uplink to the lab") is None
    assert LinkTag.decode('{"rexecd":1,"broken"') is None
    with pytest.raises(InvalidRequest):
        LinkTag("rexec0", "c" * 64, "10.88.0.2", "g" * 300).encode()


@pytest.mark.parametrize("cid", ["", "-lead", "a" * 65, "has space", "semi;colon", "a/b"])
def test_container_id_validation(cid: str) -> None:
    with pytest.raises(InvalidRequest):
        check_container_id(cid)


@pytest.mark.parametrize("name", ["", "x" * 16, 'qu"ote', "sp ace", "a{b}"])
def test_ifname_validation(name: str) -> None:
    with pytest.raises(InvalidRequest):
        check_ifname(name)
