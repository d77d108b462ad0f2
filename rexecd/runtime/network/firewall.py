"""nftables state of one daemon: NAT, host protection and L2 isolation, all in tables we own."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rexecd.errors import InvalidRequest, RuntimeFailure

from .ipam import parse_subnet
from .models import NetworkConfig
from .naming import bridge_mac, check_ifname

NFT = "nft"
_TIMEOUT = 30
_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}\Z")
PROTOCOLS = ("tcp", "udp")


def check_table(name: str) -> None:
    if not _TABLE.fullmatch(name):
        raise InvalidRequest(f"nft table name {name!r} is invalid ([A-Za-z][A-Za-z0-9_]{{0,31}})")


@dataclass(frozen=True)
class Port:
    """One container's bridge port as the bridge table knows it."""

    ifname: str
    mac: str
    ip: str


@dataclass
class FirewallState:
    """The per-container elements currently in our sets and maps."""

    ports: set[Port] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    groups: set[int] = field(default_factory=set)
    # (proto, host port) -> (container ip, container port)
    forwards: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    # Whether every table that was read exists.
    present: bool = False


def run_nft(script: str, step: str) -> None:
    """Apply ``script`` as one nft transaction: all of it or none of it."""
    try:
        proc = subprocess.run(
            [NFT, "-f", "-"], input=script, capture_output=True, text=True, timeout=_TIMEOUT
        )
    except OSError as exc:
        raise RuntimeFailure.from_oserror(step, exc) from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(step, f"nft did not finish within {_TIMEOUT}s") from exc
    if proc.returncode != 0:
        raise RuntimeFailure(step, f"nft failed: {proc.stderr.strip()[:2000]}")


def _list_tables(family_tables: list[tuple[str, str]]) -> list[list[dict[str, Any]]]:
    """The JSON objects of each (family, table); [] for a table that does not exist.

    The listings run concurrently: each nft start costs a few milliseconds."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for family, table in family_tables:
            procs.append(
                subprocess.Popen(
                    [NFT, "-j", "list", "table", family, table],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results: list[list[dict[str, Any]]] = []
        for proc in procs:
            out, err = proc.communicate(timeout=_TIMEOUT)
            if proc.returncode != 0:
                if "No such file or directory" in err:
                    results.append([])
                    continue
                raise RuntimeFailure("nft list", f"nft failed: {err.strip()[:2000]}")
            results.append(json.loads(out).get("nftables", []))
        return results
    except OSError as exc:
        raise RuntimeFailure.from_oserror("nft list", exc) from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure("nft list", f"nft did not finish within {_TIMEOUT}s") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _elements(items: list[dict[str, Any]], kind: str, name: str) -> list[Any]:
    for item in items:
        body = item.get(kind)
        if isinstance(body, dict) and body.get("name") == name:
            elems: list[Any] = body.get("elem", [])
            return elems
    return []


class Firewall:
    """Two tables named after the daemon: ``inet`` (NAT, input, forward) and ``bridge``
    (anti-spoofing and which containers may talk to which).

    Removing the two tables removes everything we ever installed. Base chains use an
    ``accept`` policy so we never override another table's verdicts; only our own
    bridge and subnet are matched.
    """

    def __init__(
        self,
        table: str,
        bridge: str,
        subnet: ipaddress.IPv4Network,
        gateway: ipaddress.IPv4Address,
        bridge_mac: str,
        gateway_tcp_ports: tuple[int, ...] = (),
        gateway_udp_ports: tuple[int, ...] = (),
        max_flows: int = 4096,
    ) -> None:
        check_table(table)
        check_ifname(bridge)
        self.table = table
        self.bridge = bridge
        self.subnet = subnet
        self.gateway = gateway
        self.bridge_mac = bridge_mac
        self.gateway_ports = {"tcp": gateway_tcp_ports, "udp": gateway_udp_ports}
        self.max_flows = max_flows

    # -- whole tables ---------------------------------------------------------------

    def render(self) -> str:
        """The base ruleset. ``add`` keeps existing sets and maps (and so the elements of
        running containers); chains are flushed and refilled, so re-running is idempotent."""
        t, br, net, gw = self.table, f'"{self.bridge}"', self.subnet, self.gateway
        # The host's conntrack table is one for every container (and the host): past
        # max_flows entries of its own, a container's new connections are dropped.
        flow_cap = (
            f"add rule inet {t} {{chain}} iifname {br} ct state new "
            f"add @flows {{{{ ip saddr ct count over {self.max_flows} }}}} drop"
        )
        allowed = [
            f"add rule inet {t} input iifname {br} ip daddr {gw} {proto} dport "
            f"{{ {', '.join(str(p) for p in sorted(ports))} }} accept"
            for proto, ports in self.gateway_ports.items()
            if ports
        ]
        lines = [
            # ---- bridge family: frames between ports of our bridge -------------------
            f"add table bridge {t}",
            f"add set bridge {t} names {{ type ifname; }}",
            f"add set bridge {t} ports {{ type ifname . ether_addr . ipv4_addr; }}",
            f"add set bridge {t} groups {{ typeof meta iifgroup . meta oifgroup; }}",
            f"add chain bridge {t} prerouting "
            "{ type filter hook prerouting priority filter; policy accept; }",
            f"flush chain bridge {t} prerouting",
            # A container may only use the MAC and address it was given: no ARP or
            # FDB poisoning of its neighbours, no spoofed sources.
            f"add rule bridge {t} prerouting iifname @names ether type ip "
            "iifname . ether saddr . ip saddr != @ports drop",
            f"add rule bridge {t} prerouting iifname @names ether type arp "
            "iifname . ether saddr . arp saddr ip != @ports drop",
            # The ARP sender MAC too: the host believes it over the frame's source.
            f"add rule bridge {t} prerouting iifname @names ether type arp "
            "iifname . arp saddr ether . arp saddr ip != @ports drop",
            # IPv4 only: no IPv6 (incl. link-local), no raw ethertypes between tenants.
            f"add rule bridge {t} prerouting iifname @names ether type != {{ ip, arp }} drop",
            f"add chain bridge {t} forward "
            "{ type filter hook forward priority filter; policy accept; }",
            f"flush chain bridge {t} forward",
            # Port-to-port: only two ports of one device group (one user) talk.
            # Ungrouped ports are in group 0, which never gets an element.
            f"add rule bridge {t} forward iifname @names meta iifgroup . meta oifgroup "
            "@groups accept",
            f"add rule bridge {t} forward iifname @names drop",
            # ---- inet family: routed traffic and the host itself ---------------------
            f"add table inet {t}",
            self._flows_set(),
            *(
                f"add map inet {t} {p}_forwards {{ type inet_service : ipv4_addr . inet_service; }}"
                for p in PROTOCOLS
            ),
            f"add chain inet {t} prerouting "
            "{ type filter hook prerouting priority raw; policy accept; }",
            f"flush chain inet {t} prerouting",
            # route_localnet is on for the bridge (port forwards need it); never let a
            # container use it to reach the host's loopback services.
            f"add rule inet {t} prerouting iifname {br} ip daddr 127.0.0.0/8 drop",
            f"add rule inet {t} prerouting iifname {br} ip saddr != {net} drop",
            # Link-local is never routed (RFC 3927); a host route to it is a cloud's
            # metadata service handing out the host's credentials.
            f"add rule inet {t} prerouting iifname {br} ip daddr 169.254.0.0/16 drop",
            f"add rule inet {t} prerouting iifname {br} meta nfproto ipv6 drop",
            f"add chain inet {t} input "
            "{ type filter hook input priority filter; policy accept; }",
            f"flush chain inet {t} input",
            flow_cap.format(chain="input"),
            f"add rule inet {t} input iifname {br} ct state established,related accept",
            *allowed,
            f"add rule inet {t} input iifname {br} ip daddr {gw} icmp type echo-request accept",
            # Everything else a container sends to the host (the daemon's port, sshd,
            # any address of any host interface) is dropped.
            f"add rule inet {t} input iifname {br} drop",
            f"add chain inet {t} forward "
            "{ type filter hook forward priority filter; policy accept; }",
            f"flush chain inet {t} forward",
            flow_cap.format(chain="forward"),
            f"add rule inet {t} forward oifname {br} ct state established,related accept",
            # With br_netfilter on, frames bridged between two ports also pass here
            # (in and out = the bridge); the bridge table already judged them. Frames
            # sent to the bridge's own MAC were routed instead: a container hairpinning
            # through the gateway to reach another tenant, dropped below.
            f"add rule inet {t} forward iifname {br} oifname {br} "
            f"ether daddr != {self.bridge_mac} accept",
            f"add rule inet {t} forward oifname {br} drop",
            f"add chain inet {t} output_nat "
            "{ type nat hook output priority -100; policy accept; }",
            f"flush chain inet {t} output_nat",
            *(
                f"add rule inet {t} output_nat ip daddr 127.0.0.1 "
                f"dnat ip to {p} dport map @{p}_forwards"
                for p in PROTOCOLS
            ),
            f"add chain inet {t} postrouting "
            "{ type nat hook postrouting priority srcnat; policy accept; }",
            f"flush chain inet {t} postrouting",
            # Port forwards: the container must answer the gateway, not 127.0.0.1.
            f"add rule inet {t} postrouting oifname {br} ip saddr 127.0.0.0/8 masquerade",
            f"add rule inet {t} postrouting oifname != {br} ip saddr {net} masquerade",
        ]
        return "\n".join(lines) + "\n"

    def install(self) -> None:
        run_nft(self.render(), "nft install")

    def remove(self) -> None:
        """Delete both tables; absent tables are fine."""
        for family in ("inet", "bridge"):
            # add-then-delete makes the delete succeed whether or not the table exists.
            run_nft(
                f"add table {family} {self.table}\ndelete table {family} {self.table}\n",
                "nft remove",
            )

    def exists(self) -> bool:
        return all(_list_tables([("inet", self.table), ("bridge", self.table)]))

    # -- per-container elements -----------------------------------------------------

    def _port_elements(self, port: Port) -> list[str]:
        t = self.table
        return [
            f'bridge {t} names {{ "{port.ifname}" }}',
            f'bridge {t} ports {{ "{port.ifname}" . {port.mac} . {port.ip} }}',
        ]

    def _flows_set(self) -> str:
        return f"add set inet {self.table} flows {{ type ipv4_addr; size 65535; flags dynamic; }}"

    def _group_element(self, group: int) -> str:
        return f"bridge {self.table} groups {{ {group} . {group} }}"

    def add_port(self, port: Port, group: int) -> None:
        check_ifname(port.ifname)
        elems = self._port_elements(port)
        if group:
            elems.append(self._group_element(group))
        run_nft("".join(f"add element {e}\n" for e in elems), "nft add port")

    def delete(
        self,
        ports: Iterable[Port] = (),
        names: Iterable[str] = (),
        groups: Iterable[int] = (),
        forwards: Iterable[tuple[str, int]] = (),
    ) -> None:
        """Remove elements in one transaction; missing ones are not an error."""
        elems: list[str] = []
        for port in ports:
            elems.extend(self._port_elements(port))
            # The flow count of its address (made by the flow-cap rule): the next
            # container given the address starts from its own connections.
            elems.append(f"inet {self.table} flows {{ {port.ip} }}")
        elems.extend(f'bridge {self.table} names {{ "{n}" }}' for n in names)
        elems.extend(self._group_element(g) for g in groups if g)
        script = [f"add element {e}\ndelete element {e}\n" for e in elems]
        if any(e.startswith(f"inet {self.table} flows ") for e in elems):
            # Tables an older rexecd made have no flows set: made here (empty) so the
            # element's add-then-delete holds there too.
            script.insert(0, self._flows_set() + "\n")
        for proto, host_port in forwards:
            # A map element cannot be re-added blindly (its value is unknown), so map
            # entries are only deleted when they were just listed.
            script.append(f"delete element inet {self.table} {proto}_forwards {{ {host_port} }}\n")
        if script:
            run_nft("".join(script), "nft delete elements")

    def state(self, bridge: bool = True) -> FirewallState:
        """Our elements; with ``bridge=False`` only the port forwards are read."""
        state = FirewallState()
        wanted = [("inet", self.table)] + ([("bridge", self.table)] if bridge else [])
        listed = _list_tables(wanted)
        state.present = all(listed)
        inet_items, *rest = listed
        for proto in PROTOCOLS:
            for e in _elements(inet_items, "map", f"{proto}_forwards"):
                host_port, target = e
                ip, port = target["concat"]
                state.forwards[(proto, int(host_port))] = (str(ip), int(port))
        bridge_items = rest[0] if rest else []
        for e in _elements(bridge_items, "set", "names"):
            state.names.add(str(e))
        for e in _elements(bridge_items, "set", "ports"):
            ifname, mac, ip = e["concat"]
            state.ports.add(Port(str(ifname), str(mac), str(ip)))
        for e in _elements(bridge_items, "set", "groups"):
            state.groups.add(int(e["concat"][0]))
        return state

    # -- port forwards ----------------------------------------------------------------

    def add_forward(self, proto: str, host_port: int, ip: str, port: int) -> None:
        run_nft(
            f"add element inet {self.table} {proto}_forwards {{ {host_port} : {ip} . {port} }}\n",
            "nft add forward",
        )


def firewall_for(cfg: NetworkConfig) -> Firewall:
    """The firewall of the daemon configured by ``cfg``."""
    net = parse_subnet(cfg.subnet)
    return Firewall(
        cfg.nft_table,
        cfg.bridge,
        net,
        net.network_address + 1,
        bridge_mac(cfg.bridge),
        gateway_tcp_ports=cfg.gateway_tcp_ports,
        gateway_udp_ports=cfg.gateway_udp_ports,
        max_flows=cfg.max_flows,
    )
