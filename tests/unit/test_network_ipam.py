"""Unit: IPAM hands out the lowest free host address and never network, gateway or broadcast."""

from __future__ import annotations

import pytest

from rexecd.errors import InvalidRequest, RuntimeUnavailable
from rexecd.runtime.network import Ipam


def test_lowest_free_skips_network_and_gateway() -> None:
    ipam = Ipam("10.88.0.0/16")
    assert str(ipam.gateway) == "10.88.0.1"
    assert ipam.allocate(set()) == "10.88.0.2"
    assert ipam.allocate({"10.88.0.2", "10.88.0.3"}) == "10.88.0.4"
    assert ipam.allocate({"10.88.0.3"}) == "10.88.0.2"


def test_fills_holes_first() -> None:
    ipam = Ipam("10.50.1.0/24")
    used = {f"10.50.1.{n}" for n in range(2, 40) if n != 17}
    assert ipam.allocate(used) == "10.50.1.17"


def test_exhaustion_raises_with_the_subnet() -> None:
    ipam = Ipam("192.168.7.0/29")  # hosts .1-.6; .1 is the gateway
    assert ipam.capacity == 5
    used: set[str] = set()
    for _ in range(5):
        used.add(ipam.allocate(used))
    assert used == {f"192.168.7.{n}" for n in range(2, 7)}
    with pytest.raises(RuntimeUnavailable) as info:
        ipam.allocate(used)
    assert info.value.extra["subnet"] == "192.168.7.0/29"


def test_broadcast_is_never_handed_out() -> None:
    ipam = Ipam("10.9.9.0/30")  # .1 gateway, .2 the only container address, .3 broadcast
    assert ipam.allocate(set()) == "10.9.9.2"
    with pytest.raises(RuntimeUnavailable):
        ipam.allocate({"10.9.9.2"})


def test_reserved_and_foreign_used_entries() -> None:
    ipam = Ipam("10.1.2.0/24", reserved=["10.1.2.2", "10.1.2.3"])
    assert ipam.capacity == 251
    # Addresses outside the subnet or malformed leases do not disturb allocation.
    assert ipam.allocate({"10.9.9.9", "not-an-ip"}) == "10.1.2.4"


@pytest.mark.parametrize("ip", ["10.1.2.0", "10.1.2.1", "10.1.2.255", "10.1.3.5", "x", "::1"])
def test_check_refuses_reserved_and_foreign(ip: str) -> None:
    with pytest.raises(InvalidRequest):
        Ipam("10.1.2.0/24").check(ip)


def test_check_accepts_a_host_address() -> None:
    Ipam("10.1.2.0/24").check("10.1.2.254")


@pytest.mark.parametrize("subnet", ["10.0.0.1/24", "fd00::/64", "10.0.0.0/31", "nonsense"])
def test_bad_subnets(subnet: str) -> None:
    with pytest.raises(InvalidRequest):
        Ipam(subnet)
