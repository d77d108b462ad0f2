"""A container's veth pair: host side on the bridge, peer as eth0 in the container's netns."""

from __future__ import annotations

import ipaddress

from .netlink import ENODEV, Netlink, Netns, delete_link, translate

CONTAINER_IFNAME = "eth0"


def create_pair(
    nl: Netlink,
    host: str,
    bridge_idx: int,
    ns: Netns,
    mac: str,
    group: int,
    alias: str,
    isolated: bool,
) -> int:
    """Create the pair, peer directly inside the container's netns and named eth0.

    Creating the peer in place (IFLA_NET_NS_FD in the peer info) saves the move and
    rename requests, and the host side is born enslaved to the bridge and in its device
    group, so no window exists in which it is a free-standing host interface. It stays
    down until the caller has installed its firewall elements.
    """
    with translate("veth add", host):
        nl.add_veth(
            host,
            master=bridge_idx,
            group=group,
            peer=CONTAINER_IFNAME,
            peer_netns_fd=ns.fd,
            peer_mac=mac,
        )
        idx = nl.link_index(host)
        if idx is None:
            raise OSError(ENODEV, "created but not found")
    with translate("veth tag", host):
        nl.set_link(idx, alias=alias)
        # An isolated port cannot exchange frames with another isolated port, whatever
        # the firewall says: the default for a container without a group.
        nl.set_isolated(idx, isolated)
    return idx


def configure_container(ns: Netns, ip: str, prefixlen: int, gateway: str) -> None:
    """lo up, eth0 addressed and up, default route via the gateway."""
    ipaddress.IPv4Address(ip)
    with ns.session() as nsr:
        with translate("netns lo", f"lo in netns of pid {ns.pid}"):
            lo = nsr.link_index("lo")
            if lo is None:
                raise OSError(ENODEV, "no loopback")
            nsr.set_link(lo, up=True)
        what = f"{CONTAINER_IFNAME} in netns of pid {ns.pid}"
        with translate("netns eth0", what):
            eth0 = nsr.link_index(CONTAINER_IFNAME)
            if eth0 is None:
                raise OSError(ENODEV, "peer missing")
            nsr.add_addr(eth0, ip, prefixlen)
            nsr.set_link(eth0, up=True)
        with translate("netns route", f"default via {gateway} in netns of pid {ns.pid}"):
            nsr.add_default_route(gateway, eth0)


def set_up(nl: Netlink, idx: int, host: str) -> None:
    with translate("veth up", host):
        nl.set_link(idx, up=True)


def delete(nl: Netlink, host: str) -> bool:
    """Delete the host side (the peer dies with it); False when it was already gone,
    for instance because the container's netns died and took the pair along."""
    return delete_link(nl, nl.link_index(host), host, "veth del")
