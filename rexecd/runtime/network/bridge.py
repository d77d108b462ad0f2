"""The host bridge: creation with its gateway address, sysctls, and listing of its ports."""

from __future__ import annotations

import ipaddress

from rexecd.errors import Conflict, RuntimeFailure

from .netlink import EEXIST, ENODEV, Link, Netlink, delete_link, failure, translate


def list_links(nl: Netlink) -> list[Link]:
    with translate("netlink", "dump links"):
        return nl.links()


def get_link(nl: Netlink, name: str) -> Link | None:
    try:
        return nl.get_link(name)
    except Exception as exc:
        raise failure("netlink", f"get link {name}", exc) from exc


def bridge_index(nl: Netlink, name: str) -> int | None:
    link = get_link(nl, name)
    if link is None:
        return None
    if link.kind != "bridge":
        raise Conflict(f"link {name} exists and is not a bridge", kind=link.kind)
    return link.index


def check_overlap(nl: Netlink, bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that overlaps an address of another host interface: its routes
    would fight ours (another daemon's bridge, the LAN, a VPN)."""
    with translate("netlink", "dump addresses"):
        names = {link.index: link.name for link in list_links(nl)}
        for addr in nl.addrs():
            owner = names.get(addr.index, "?")
            if owner == bridge:
                continue
            net = ipaddress.IPv4Network(f"{addr.address}/{addr.prefixlen}", strict=False)
            if net.overlaps(subnet) and not net.is_loopback:
                raise Conflict(f"subnet {subnet} overlaps {net} on {owner}", link=owner)


def ensure_bridge(nl: Netlink, name: str, gateway: ipaddress.IPv4Interface, mac: str) -> int:
    """The bridge up with ``gateway`` on it; created when missing. Idempotent."""
    idx = bridge_index(nl, name)
    if idx is None:
        try:
            # STP stays off (the default): with it, every new port would wait in the
            # listening/learning states before forwarding a frame.
            nl.add_bridge(name, mac)
        except Exception as exc:
            if getattr(exc, "code", None) != EEXIST:
                raise failure("bridge add", name, exc) from exc
        idx = bridge_index(nl, name)
        if idx is None:
            raise RuntimeFailure("bridge add", f"{name}: created but not found", ENODEV)
    with translate("bridge address", f"{gateway} on {name}"):
        have = {(a.address, a.prefixlen) for a in nl.addrs(idx)}
        if (str(gateway.ip), gateway.network.prefixlen) not in have:
            nl.add_addr(idx, str(gateway.ip), gateway.network.prefixlen)
    with translate("bridge up", name):
        nl.set_link(idx, up=True)
    return idx


def no_linklocal_learn(name: str) -> None:
    """Stop the bridge learning source MACs from frames sent to the IEEE link-local group
    addresses (01:80:c2:00:00:0X). The bridge learns those before (LLDP) or without
    passing the nft prerouting hook that checks a port's MAC, so a container could move
    a neighbour's MAC to its own port, and the traffic sent to it with it."""
    path = f"/sys/class/net/{name}/bridge/no_linklocal_learn"
    with translate("bridge no_linklocal_learn", path):
        with open(path, encoding="ascii") as f:
            if f.read().strip() == "1":
                return
        with open(path, "w", encoding="ascii") as f:
            f.write("1")


def delete_bridge(nl: Netlink, name: str) -> bool:
    return delete_link(nl, bridge_index(nl, name), name, "bridge del")


def write_sysctl(key: str, value: str) -> None:
    """Write /proc/sys/<key> (slash-separated: interface names may hold dots), skipping
    the write when the value is already there."""
    path = f"/proc/sys/{key}"
    with translate("sysctl", path):
        with open(path, encoding="ascii") as f:
            if f.read().strip() == value:
                return
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
