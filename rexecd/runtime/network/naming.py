"""Deterministic link names, MAC addresses and link tags derived from a container id."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from rexecd.errors import InvalidRequest

VETH_PREFIX = "rx"
IFB_PREFIX = "ri"
# 44 bits of hash keep the name at 13 characters (IFNAMSIZ allows 15) while making a
# collision between two live containers of one bridge vanishingly unlikely.
_HEX_LEN = 11
_OUR_NAME = re.compile(r"^(rx|ri)[0-9a-f]{11}\Z")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
_GROUP_MAX = 64
# The kernel caps IFLA_IFALIAS at IFALIASZ - 1 bytes.
_ALIAS_MAX = 255


def check_container_id(container_id: str) -> None:
    if not _CONTAINER_ID.fullmatch(container_id):
        raise InvalidRequest(f"container id {container_id!r} is not a valid network id")


def check_ifname(name: str) -> None:
    """Refuse names the kernel would reject or that could break an nft ruleset string."""
    if not _IFNAME.fullmatch(name):
        raise InvalidRequest(f"interface name {name!r} is invalid (1-15 of [A-Za-z0-9_.-])")


def check_group(group: str) -> None:
    if not group or len(group) > _GROUP_MAX or not group.isprintable():
        raise InvalidRequest(f"network group {group!r} is invalid")


def _digest(bridge: str, container_id: str) -> str:
    # The bridge is part of the key so two daemons that happen to use the same
    # container id never fight over one host link name.
    return hashlib.sha256(f"{bridge}\0{container_id}".encode()).hexdigest()


def host_ifname(bridge: str, container_id: str) -> str:
    """Host-side veth name: ``rx`` + 11 hex digits, stable for (bridge, container id)."""
    return VETH_PREFIX + _digest(bridge, container_id)[:_HEX_LEN]


def ifb_ifname(bridge: str, container_id: str) -> str:
    """IFB name shaping the container's outbound traffic: ``ri`` + the veth's 11 hex digits."""
    return IFB_PREFIX + _digest(bridge, container_id)[:_HEX_LEN]


def is_our_name(name: str) -> bool:
    return bool(_OUR_NAME.fullmatch(name))


def _mac(seed: bytes) -> str:
    raw = hashlib.sha256(seed).digest()[:5]
    # 0x02: locally administered, unicast.
    return ":".join(f"{b:02x}" for b in (0x02, *raw))


def container_mac(bridge: str, container_id: str) -> str:
    """A stable MAC for the container's eth0, so ARP caches survive a re-attach."""
    return _mac(f"mac\0{bridge}\0{container_id}".encode())


def bridge_mac(bridge: str) -> str:
    """A fixed bridge MAC: otherwise the bridge takes the lowest port MAC and changes it as
    containers come and go, which makes every container re-ARP its gateway."""
    return _mac(f"bridge\0{bridge}".encode())


@dataclass(frozen=True)
class LinkTag:
    """What a host link records about itself in IFLA_IFALIAS, so detach and reconcile
    work after a daemon restart without the daemon's database."""

    bridge: str
    container_id: str
    ip: str
    group: str | None = None

    def encode(self) -> str:
        body = {"rexecd": 1, "br": self.bridge, "id": self.container_id, "ip": self.ip}
        if self.group is not None:
            body["g"] = self.group
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=True)
        if len(text) > _ALIAS_MAX:
            raise InvalidRequest("container id and group are too long for a link tag")
        return text

    @classmethod
    def decode(cls, alias: str | None) -> LinkTag | None:
        """The tag, or None for an alias we did not write."""
        if not alias or not alias.startswith('{"rexecd":1'):
            return None
        try:
            body = json.loads(alias)
            group = body.get("g")
            return cls(
                bridge=str(body["br"]),
                container_id=str(body["id"]),
                ip=str(body["ip"]),
                group=None if group is None else str(group),
            )
        except (ValueError, KeyError, TypeError):
            return None
