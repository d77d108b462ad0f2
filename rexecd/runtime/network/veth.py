"""A container's veth pair: host side on the bridge, peer as eth0 in the container's netns."""

from __future__ import annotations

import ipaddress
from typing import Any

from rexecd.errors import RuntimeFailure

from .netlink import ENODEV, ContainerNetns, failure, is_missing, link_index, translate

CONTAINER_IFNAME = "eth0"


def create_pair(
    ipr: Any,
    host: str,
    bridge_idx: int,
    ns: ContainerNetns,
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
        ipr.link(
            "add",
            ifname=host,
            kind="veth",
            master=bridge_idx,
            group=group,
            peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": ns.fd, "address": mac},
        )
        idx = link_index(ipr, host)
        if idx is None:
            raise OSError(ENODEV, "created but not found")
    with translate("veth tag", host):
        ipr.link("set", index=idx, ifalias=alias)
        # An isolated port cannot exchange frames with another isolated port, whatever
        # the firewall says: the default for a container without a group.
        ipr.brport("set", index=idx, isolated=1 if isolated else 0)
    return int(idx)


def configure_container(ns: ContainerNetns, ip: str, prefixlen: int, gateway: str) -> None:
    """lo up, eth0 addressed and up, default route via the gateway."""
    ipaddress.IPv4Address(ip)
    with ns.session() as nsr:
        with translate("netns lo", f"lo in netns of pid {ns.pid}"):
            lo = link_index(nsr, "lo")
            if lo is None:
                raise OSError(ENODEV, "no loopback")
            nsr.link("set", index=lo, state="up")
        what = f"{CONTAINER_IFNAME} in netns of pid {ns.pid}"
        with translate("netns eth0", what):
            eth0 = link_index(nsr, CONTAINER_IFNAME)
            if eth0 is None:
                raise OSError(ENODEV, "peer missing")
            nsr.addr("add", index=eth0, address=ip, prefixlen=prefixlen)
            nsr.link("set", index=eth0, state="up")
        with translate("netns route", f"default via {gateway} in netns of pid {ns.pid}"):
            nsr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth0)


def set_up(ipr: Any, idx: int, host: str) -> None:
    with translate("veth up", host):
        ipr.link("set", index=idx, state="up")


def delete(ipr: Any, host: str) -> bool:
    """Delete the host side (the peer dies with it); False when it was already gone,
    for instance because the container's netns died and took the pair along."""
    idx = link_index(ipr, host)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except Exception as exc:
        if is_missing(exc):
            return False
        raise failure("veth del", host, exc) from exc
    return True


def require(ipr: Any, host: str) -> int:
    idx = link_index(ipr, host)
    if idx is None:
        raise RuntimeFailure("veth", f"{host}: no such device", ENODEV)
    return idx
