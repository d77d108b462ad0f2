"""IPv4 address management for one container subnet: pure arithmetic, no kernel, no storage."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from rexecd.errors import InvalidRequest, RuntimeUnavailable


def parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    """An IPv4 network with room for a gateway and at least one container."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"subnet {subnet!r} is invalid: {exc}") from exc
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidRequest(f"subnet {subnet!r} is not IPv4")
    if net.prefixlen > 30:
        raise InvalidRequest(f"subnet {subnet!r} is too small (need /30 or larger)")
    return net


class Ipam:
    """Allocates the lowest free host address of a subnet.

    The network address, the gateway (first host) and the broadcast address are never
    handed out. Leases live in the daemon's store; callers pass the addresses in use.
    """

    def __init__(self, subnet: str, reserved: Iterable[str] = ()) -> None:
        self.network = parse_subnet(subnet)
        self.gateway = self.network.network_address + 1
        self._reserved = {int(self._parse(r)) for r in reserved}

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    @property
    def capacity(self) -> int:
        """How many container addresses the subnet holds, reserved ones excluded."""
        first, last = self._bounds()
        reserved = sum(1 for r in self._reserved if first <= r <= last)
        return last - first + 1 - reserved

    def _bounds(self) -> tuple[int, int]:
        # gateway + 1 up to broadcast - 1
        return int(self.gateway) + 1, int(self.network.broadcast_address) - 1

    def _parse(self, ip: str) -> ipaddress.IPv4Address:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise InvalidRequest(f"address {ip!r} is not an IPv4 address") from exc
        if addr not in self.network:
            raise InvalidRequest(f"address {ip} is outside {self.network}")
        return addr

    def check(self, ip: str) -> None:
        """Raise InvalidRequest unless ``ip`` may be given to a container."""
        value = int(self._parse(ip))
        first, last = self._bounds()
        if not first <= value <= last or value in self._reserved:
            raise InvalidRequest(f"address {ip} is reserved in {self.network}")

    def allocate(self, used: Iterable[str]) -> str:
        """The lowest free container address; RuntimeUnavailable when the subnet is full."""
        taken = set(self._reserved)
        for ip in used:
            try:
                taken.add(int(ipaddress.IPv4Address(ip)))
            except ValueError:
                # A malformed lease cannot collide with a real address.
                continue
        first, last = self._bounds()
        for value in range(first, last + 1):
            if value not in taken:
                return str(ipaddress.IPv4Address(value))
        raise RuntimeUnavailable(
            f"no free address left in {self.network}", subnet=str(self.network)
        )
