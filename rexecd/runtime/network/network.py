"""A daemon's container network: host setup, attach/detach of containers, bandwidth, reconcile."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from rexecd.errors import Conflict, NotFound, RuntimeFailure

from . import etcfiles, shaping, veth
from .bridge import (
    bridge_index,
    check_overlap,
    delete_bridge,
    ensure_bridge,
    get_link,
    list_links,
    no_linklocal_learn,
    write_sysctl,
)
from .firewall import FirewallState, Port, check_table, firewall_for
from .ipam import Ipam
from .models import Attachment, NetworkConfig
from .naming import (
    IFB_PREFIX,
    VETH_PREFIX,
    LinkTag,
    bridge_mac,
    check_container_id,
    check_group,
    check_ifname,
    container_mac,
    host_ifname,
    ifb_ifname,
    is_our_name,
)
from .netlink import Link, Netlink, NetlinkOpener, Pyroute2Opener

log = logging.getLogger(__name__)


class Network:
    """The container network of one daemon: a bridge, a subnet and two nft tables.

    Isolation between containers, at layer 2 on the bridge:

    * a container without a group gets a bridge port with the kernel's ``isolated``
      flag: it cannot exchange frames with any other isolated port, firewall or not;
    * containers of one group (one user) share a device group number (IFLA_GROUP on
      the host veth, allocated per bridge, recorded with the group name in the link's
      alias) and an nft bridge-family rule lets a frame pass between two ports only
      when ``iifgroup . oifgroup`` is in the set of groups, which holds ``g . g`` for
      each group in use. Every other port-to-port frame is dropped, so a grouped
      (non-isolated) port still cannot reach an ungrouped one;
    * per port, nft accepts only the MAC and IPv4 address we assigned (ARP included),
      so no container can impersonate a neighbour or the gateway;
    * routed hairpins (a frame sent to the gateway's MAC but addressed to another
      container) are dropped in the inet forward chain.

    Bridge-family nftables needs no br_netfilter; when br_netfilter is on anyway the
    rules still hold (see ``Firewall.render``).

    All methods are synchronous and thread-safe; one lock serialises changes to the
    bridge and its sets, which keeps the group allocation race-free.
    """

    def __init__(self, cfg: NetworkConfig, netlink: NetlinkOpener | None = None) -> None:
        check_ifname(cfg.bridge)
        check_table(cfg.nft_table)
        self.cfg = cfg
        self.ipam = Ipam(cfg.subnet)
        self._gateway = ipaddress.IPv4Interface(f"{self.ipam.gateway}/{self.ipam.prefixlen}")
        self.firewall = firewall_for(cfg)
        self._netlink: NetlinkOpener = netlink or Pyroute2Opener()
        self._lock = threading.Lock()

    # -- host ------------------------------------------------------------------------

    def gateway(self) -> str:
        return str(self._gateway.ip)

    def setup_host(self) -> None:
        """Bridge up with the gateway address, forwarding on, our nft tables in place.

        Idempotent, and safe while containers run: existing set and map elements (ports,
        groups, forwards) are kept.
        """
        bridge = self.cfg.bridge
        with self._lock, self._netlink.host() as nl:
            check_overlap(nl, bridge, self.ipam.network)
            ensure_bridge(nl, bridge, self._gateway, bridge_mac(bridge))
            # ip_forward is global and stays on at teardown: other daemons on the host
            # may rely on it, and it was most likely on before us anyway.
            write_sysctl("net/ipv4/ip_forward", "1")
            write_sysctl(f"net/ipv4/conf/{bridge}/route_localnet", "1")
            no_linklocal_learn(bridge)
            if os.path.exists(f"/proc/sys/net/ipv6/conf/{bridge}"):
                # Containers get IPv4 only; a link-local v6 address on the bridge would
                # be one more host address to defend.
                write_sysctl(f"net/ipv6/conf/{bridge}/disable_ipv6", "1")
            self.firewall.install()

    def teardown_host(self) -> None:
        """Remove every container link of ours, the bridge and both nft tables. Idempotent."""
        with self._lock, self._netlink.host() as nl:
            self._sweep(nl, set())
            delete_bridge(nl, self.cfg.bridge)
            self.firewall.remove()

    # -- containers ------------------------------------------------------------------

    def attach(
        self, container_id: str, pid: int, ip: str, mbps: int | None, group: str | None = None
    ) -> Attachment:
        """Give the netns of ``pid`` an eth0 with ``ip`` on our bridge, shaped at ``mbps``.

        On failure nothing is left behind (links, IFB, nft elements).
        """
        check_container_id(container_id)
        if group is not None:
            check_group(group)
        shaping.check_mbps(mbps)
        self.ipam.check(ip)
        bridge = self.cfg.bridge
        host = host_ifname(bridge, container_id)
        ifb = ifb_ifname(bridge, container_id)
        mac = container_mac(bridge, container_id)
        alias = LinkTag(bridge, container_id, ip, group).encode()
        port = Port(host, mac, ip)
        with (
            self._lock,
            self._netlink.host() as nl,
            self._netlink.netns(pid) as ns,
            ExitStack() as undo,
        ):
            br = self._require_bridge(nl)
            if get_link(nl, host) is not None:
                raise Conflict(f"container {container_id} is already attached ({host})")
            ports = self._ports(nl, br)
            for link in ports:
                tag = LinkTag.decode(link.alias)
                if tag is not None and tag.ip == ip:
                    raise Conflict(f"address {ip} is in use by {tag.container_id}")
            devgroup = self._devgroup(ports, group) if group is not None else 0
            # Undo runs last-in first-out: the nft elements go after the veth, so the
            # group element is seen memberless and goes too.
            undo.callback(self._best_effort, "nft delete", self._forget_port, nl, br, port)
            # Registered before the pair exists: a failure inside create_pair after
            # the link was made must remove it too; deleting an absent link is a no-op.
            undo.callback(self._best_effort, "veth del", veth.delete, nl, host)
            idx = veth.create_pair(nl, host, br, ns, mac, devgroup, alias, group is None)
            veth.configure_container(ns, ip, self.ipam.prefixlen, self.gateway())
            if mbps is not None:
                undo.callback(self._best_effort, "ifb del", shaping.delete_ifb, nl, ifb)
                shaping.apply(nl, host, ifb, alias, mbps)
            self.firewall.add_port(port, devgroup)
            # Up last: until the firewall knows the port, the bridge would carry no
            # frame from it anyway (fail closed), but there is no reason to try.
            veth.set_up(nl, idx, host)
            undo.pop_all()
        return Attachment(
            container_id=container_id,
            host_ifname=host,
            ip=ip,
            prefixlen=self.ipam.prefixlen,
            gateway=self.gateway(),
            mac=mac,
            mbps=mbps,
            group=group,
        )

    def detach(self, container_id: str) -> None:
        """Remove the container's links, shaping, nft elements and port forwards. Idempotent."""
        check_container_id(container_id)
        bridge = self.cfg.bridge
        host = host_ifname(bridge, container_id)
        with self._lock, self._netlink.host() as nl:
            br = bridge_index(nl, bridge)
            link = get_link(nl, host)
            ours = link is not None and br is not None and link.master == br
            tag = LinkTag.decode(link.alias) if link is not None and ours else None
            if ours:
                veth.delete(nl, host)
            self._delete_ifb(nl, ifb_ifname(bridge, container_id))
            if link is None or tag is None or tag.container_id != container_id:
                # The pair is gone (the netns died and took it along): find what the
                # firewall still holds for this port by listing it.
                state = self.firewall.state()
                ips = {p.ip for p in state.ports if p.ifname == host}
                self._prune_firewall(nl, br, state, {host}, ips)
                return
            # The tag says exactly which elements this port has; only the port
            # forwards need listing.
            live_groups = {port.group for port in self._ports(nl, br)}
            state = self.firewall.state(bridge=False)
            if not state.present:
                return  # our tables are gone (teardown_host): so are their elements
            forwards = state.forwards
            self.firewall.delete(
                ports={Port(host, container_mac(bridge, container_id), tag.ip)},
                names={host},
                groups={link.group} - live_groups - {0},
                forwards={key for key, (ip, _) in forwards.items() if ip == tag.ip},
            )

    def set_bandwidth(self, container_id: str, mbps: int | None) -> None:
        """Change (or with None remove) the container's shaping while it runs."""
        check_container_id(container_id)
        shaping.check_mbps(mbps)
        host = host_ifname(self.cfg.bridge, container_id)
        ifb = ifb_ifname(self.cfg.bridge, container_id)
        with self._lock, self._netlink.host() as nl:
            link = self._our_port(nl, host, container_id)
            if mbps is None:
                shaping.remove(nl, host, ifb)
            else:
                shaping.apply(nl, host, ifb, link.alias or "", mbps)

    def attachments(self) -> list[Attachment]:
        """What is attached now, read back from the kernel (for re-adoption after restart)."""
        out: list[Attachment] = []
        with self._lock, self._netlink.host() as nl:
            br = bridge_index(nl, self.cfg.bridge)
            if br is None:
                return out
            for link in self._ports(nl, br):
                tag = LinkTag.decode(link.alias)
                if tag is None:
                    continue
                out.append(
                    Attachment(
                        container_id=tag.container_id,
                        host_ifname=link.name,
                        ip=tag.ip,
                        prefixlen=self.ipam.prefixlen,
                        gateway=self.gateway(),
                        mac=container_mac(self.cfg.bridge, tag.container_id),
                        mbps=shaping.rate_mbps(nl, link.index),
                        group=tag.group,
                    )
                )
        return out

    def reconcile(self, live_ids: set[str]) -> list[str]:
        """Remove links, IFBs and nft elements of containers not in ``live_ids``.

        Only veths named with our prefix and enslaved to our bridge, and IFBs whose tag
        names our bridge, are considered: other daemons' links are never touched.
        Returns what was removed (link names, then ``nft ...`` descriptions).
        """
        with self._lock, self._netlink.host() as nl:
            return self._sweep(nl, live_ids)

    @staticmethod
    def write_etc_files(
        rootfs_etc: int | str | os.PathLike[str], hostname: str, ip: str, dns: Sequence[str]
    ) -> None:
        """/etc/hosts and /etc/resolv.conf for a container (see ``etcfiles``)."""
        etcfiles.write_etc_files(rootfs_etc, hostname, ip, dns)

    # -- internals -------------------------------------------------------------------

    def _require_bridge(self, nl: Netlink) -> int:
        br = bridge_index(nl, self.cfg.bridge)
        if br is None:
            raise RuntimeFailure("bridge", f"{self.cfg.bridge} does not exist (setup_host first)")
        return br

    def _our_port(self, nl: Netlink, host: str, container_id: str) -> Link:
        br = self._require_bridge(nl)
        link = get_link(nl, host)
        if link is None or link.master != br:
            raise NotFound(f"container {container_id} is not attached")
        return link

    @staticmethod
    def _ports(nl: Netlink, br: int | None) -> list[Link]:
        """Our container veths: our name pattern and enslaved to our bridge."""
        if br is None:
            return []
        return [
            link
            for link in list_links(nl)
            if link.kind == "veth"
            and link.master == br
            and link.name.startswith(VETH_PREFIX)
            and is_our_name(link.name)
        ]

    def _our_ifb(self, link: Link) -> bool:
        if link.kind != "ifb" or not link.name.startswith(IFB_PREFIX):
            return False
        tag = LinkTag.decode(link.alias)
        return is_our_name(link.name) and tag is not None and tag.bridge == self.cfg.bridge

    def _delete_ifb(self, nl: Netlink, name: str) -> bool:
        link = get_link(nl, name)
        if link is None or not self._our_ifb(link):
            return False
        return shaping.delete_ifb(nl, name)

    @staticmethod
    def _devgroup(ports: list[Link], group: str) -> int:
        """The device group number of ``group`` on this bridge, or the lowest free one."""
        used = set()
        for link in ports:
            tag = LinkTag.decode(link.alias)
            if tag is not None and tag.group == group and link.group:
                return link.group
            used.add(link.group)
        number = 1
        while number in used:
            number += 1
        return number

    def _forget_port(self, nl: Netlink, br: int, port: Port) -> None:
        self._prune_firewall(nl, br, self.firewall.state(), {port.ifname}, {port.ip})

    def _prune_firewall(
        self,
        nl: Netlink,
        br: int | None,
        state: FirewallState,
        gone: set[str] | None,
        gone_ips: set[str] | None,
    ) -> list[str]:
        """Delete nft elements of ports that no longer exist.

        ``gone``/``gone_ips`` name a departing container; None means "every element
        without a live port" (reconcile). Group elements without a member always go.
        """
        live = self._ports(nl, br)
        live_names = {link.name for link in live}
        live_groups = {link.group for link in live}
        if gone is None:
            gone = (state.names | {p.ifname for p in state.ports}) - live_names
        gone -= live_names
        live_ips = {p.ip for p in state.ports if p.ifname in live_names}
        if gone_ips is None:
            gone_ips = {p.ip for p in state.ports} | {ip for ip, _ in state.forwards.values()}
        gone_ips -= live_ips
        ports = {p for p in state.ports if p.ifname in gone}
        names = state.names & gone
        groups = state.groups - live_groups
        forwards = {key for key, (ip, _) in state.forwards.items() if ip in gone_ips}
        self.firewall.delete(ports=ports, names=names, groups=groups, forwards=forwards)
        return (
            [f"nft port {n}" for n in sorted(names | {p.ifname for p in ports})]
            + [f"nft group {g}" for g in sorted(groups)]
            + [f"nft forward {proto}/{port}" for proto, port in sorted(forwards)]
        )

    def _sweep(self, nl: Netlink, live_ids: set[str]) -> list[str]:
        bridge = self.cfg.bridge
        keep = {host_ifname(bridge, cid) for cid in live_ids} | {
            ifb_ifname(bridge, cid) for cid in live_ids
        }
        br = bridge_index(nl, bridge)
        removed: list[str] = []
        for link in self._ports(nl, br):
            if link.name not in keep and veth.delete(nl, link.name):
                removed.append(link.name)
        for link in list_links(nl):
            if self._our_ifb(link) and link.name not in keep and shaping.delete_ifb(nl, link.name):
                removed.append(link.name)
        removed.extend(self._prune_firewall(nl, br, self.firewall.state(), None, None))
        return removed

    @staticmethod
    def _best_effort(what: str, fn: Callable[..., object], *args: Any) -> None:
        # Rollback must not hide the error that caused it.
        try:
            fn(*args)
        except Exception:
            log.exception("network rollback step %r failed", what)
