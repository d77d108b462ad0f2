"""Per-container bandwidth: tbf on the host veth (inbound), tbf on a mirred-fed IFB (outbound)."""

from __future__ import annotations

from typing import Any

from rexecd.errors import InvalidRequest, RuntimeFailure

from .netlink import EINVAL, ENODEV, TC_H_ROOT, Netlink, delete_link, failure, is_missing, translate

# tbf's 32-bit rate field counts bytes per second; above this it would wrap.
MAX_MBPS = 34_000
_INGRESS = 0xFFFF0000
_TC_H_INGRESS = 0xFFFFFFF1
_ETH_P_ALL = 0x0003
# Queue up to this much delay before tbf drops: enough for TCP to find the rate,
# short enough not to bloat interactive latency.
_LATENCY = "50ms"


def check_mbps(mbps: int | None) -> None:
    if mbps is not None and not 1 <= mbps <= MAX_MBPS:
        raise InvalidRequest(f"bandwidth {mbps} Mbit/s is out of range (1-{MAX_MBPS})")


def tbf_params(mbps: int) -> dict[str, Any]:
    """tbf arguments for ``mbps``: 10 ms worth of burst, but never below 16 KiB: at
    low rates 10 ms is less than one full-size frame, which tbf could then never send."""
    bytes_per_s = mbps * 125_000
    return {"rate": f"{mbps}mbit", "burst": max(bytes_per_s // 100, 16_384), "latency": _LATENCY}


def _set_tbf(nl: Netlink, index: int, ifname: str, mbps: int) -> None:
    with translate("tc tbf", ifname):
        nl.replace_tbf(index, 0x10000, **tbf_params(mbps))


def _del_qdisc(nl: Netlink, index: int, ifname: str, parent: int) -> None:
    try:
        nl.del_qdisc(index, parent)
    except Exception as exc:
        # EINVAL: the kernel's answer for "no such root qdisc" on a noqueue device.
        if not is_missing(exc, EINVAL):
            raise failure("tc del", ifname, exc) from exc


def apply(nl: Netlink, veth: str, ifb: str, ifb_alias: str, mbps: int) -> bool:
    """Shape ``veth`` both ways at ``mbps``; returns True when the IFB was created.

    Inbound (host -> container) leaves the host veth: its root tbf shapes it. Outbound
    arrives on the host veth's ingress, where no queue exists, so a u32 match-all
    filter redirects it (mirred) to the IFB, whose root tbf shapes it before the IFB
    hands it back to the veth's receive path (and so to the bridge).
    """
    check_mbps(mbps)
    veth_idx = nl.link_index(veth)
    if veth_idx is None:
        raise RuntimeFailure("tc", f"{veth}: no such device", ENODEV)
    _set_tbf(nl, veth_idx, veth, mbps)
    ifb_idx = nl.link_index(ifb)
    created = ifb_idx is None
    if ifb_idx is None:
        with translate("ifb add", ifb):
            nl.add_ifb(ifb)
            ifb_idx = nl.link_index(ifb)
            if ifb_idx is None:
                raise OSError(ENODEV, "created but not found")
            nl.set_link(ifb_idx, alias=ifb_alias, up=True)
    _set_tbf(nl, ifb_idx, ifb, mbps)
    if created:
        # A fresh IFB means the redirect (if any) points at a dead ifindex: rebuild it.
        _del_qdisc(nl, veth_idx, veth, parent=_TC_H_INGRESS)
        with translate("tc ingress", veth):
            nl.add_ingress(veth_idx, _INGRESS)
            nl.redirect_all(
                veth_idx,
                parent=_INGRESS,
                prio=1,
                protocol=_ETH_P_ALL,
                classid=0x10001,
                to_index=ifb_idx,
            )
    return created


def remove(nl: Netlink, veth: str, ifb: str) -> bool:
    """Drop shaping from ``veth`` and delete its IFB; returns True if the IFB existed."""
    veth_idx = nl.link_index(veth)
    if veth_idx is not None:
        _del_qdisc(nl, veth_idx, veth, parent=_TC_H_INGRESS)
        _del_qdisc(nl, veth_idx, veth, parent=TC_H_ROOT)
    return delete_ifb(nl, ifb)


def delete_ifb(nl: Netlink, ifb: str) -> bool:
    return delete_link(nl, nl.link_index(ifb), ifb, "ifb del")


def rate_mbps(nl: Netlink, index: int) -> int | None:
    """The tbf rate on a link's root in Mbit/s, or None when it is not shaped."""
    rate = nl.root_tbf_rate(index)
    return None if rate is None else round(rate * 8 / 1_000_000)
