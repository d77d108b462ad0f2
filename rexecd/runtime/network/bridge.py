"""The host bridge: creation with its gateway address, sysctls, and listing of its ports."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from rexecd.errors import Conflict, RuntimeFailure

from .netlink import EEXIST, ENODEV, delete_link, failure, is_missing, translate


@dataclass(frozen=True)
class Link:
    """The few attributes of a host link that our bookkeeping reads."""

    index: int
    name: str
    kind: str | None
    master: int | None
    group: int
    alias: str | None


def _link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    return Link(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=info.get_attr("IFLA_INFO_KIND") if info is not None else None,
        master=msg.get_attr("IFLA_MASTER"),
        group=int(msg.get_attr("IFLA_GROUP") or 0),
        alias=msg.get_attr("IFLA_IFALIAS"),
    )


def list_links(ipr: Any) -> list[Link]:
    with translate("netlink", "dump links"):
        return [_link(msg) for msg in ipr.get_links()]


def get_link(ipr: Any, name: str) -> Link | None:
    try:
        msgs = ipr.link("get", ifname=name)
    except Exception as exc:
        if is_missing(exc):
            return None
        raise failure("netlink", f"get link {name}", exc) from exc
    return _link(msgs[0]) if msgs else None


def bridge_index(ipr: Any, name: str) -> int | None:
    link = get_link(ipr, name)
    if link is None:
        return None
    if link.kind != "bridge":
        raise Conflict(f"link {name} exists and is not a bridge", kind=link.kind)
    return link.index


def check_overlap(ipr: Any, bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that overlaps an address of another host interface: its routes
    would fight ours (another daemon's bridge, the LAN, a VPN)."""
    with translate("netlink", "dump addresses"):
        names = {link.index: link.name for link in list_links(ipr)}
        for msg in ipr.get_addr(family=socket.AF_INET):
            owner = names.get(int(msg["index"]), "?")
            if owner == bridge:
                continue
            net = ipaddress.IPv4Network(
                f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False
            )
            if net.overlaps(subnet) and not net.is_loopback:
                raise Conflict(f"subnet {subnet} overlaps {net} on {owner}", link=owner)


def ensure_bridge(ipr: Any, name: str, gateway: ipaddress.IPv4Interface, mac: str) -> int:
    """The bridge up with ``gateway`` on it; created when missing. Idempotent."""
    idx = bridge_index(ipr, name)
    if idx is None:
        try:
            # STP stays off (the default): with it, every new port would wait in the
            # listening/learning states before forwarding a frame.
            ipr.link("add", ifname=name, kind="bridge", address=mac)
        except Exception as exc:
            if getattr(exc, "code", None) != EEXIST:
                raise failure("bridge add", name, exc) from exc
        idx = bridge_index(ipr, name)
        if idx is None:
            raise RuntimeFailure("bridge add", f"{name}: created but not found", ENODEV)
    with translate("bridge address", f"{gateway} on {name}"):
        have = {
            (msg.get_attr("IFA_ADDRESS"), int(msg["prefixlen"]))
            for msg in ipr.get_addr(index=idx, family=socket.AF_INET)
        }
        if (str(gateway.ip), gateway.network.prefixlen) not in have:
            ipr.addr("add", index=idx, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
    with translate("bridge up", name):
        ipr.link("set", index=idx, state="up")
    return idx


def delete_bridge(ipr: Any, name: str) -> bool:
    return delete_link(ipr, bridge_index(ipr, name), name, "bridge del")


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
