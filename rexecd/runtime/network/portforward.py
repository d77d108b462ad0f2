"""Host loopback ports forwarded to containers by nftables DNAT (no userspace proxy)."""

from __future__ import annotations

import socket
import threading

from rexecd.errors import Conflict, InvalidRequest

from .firewall import PROTOCOLS, firewall_for
from .ipam import Ipam
from .models import NetworkConfig, PortForward


def _check_port(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"{what} {port} is out of range (1-65535)")


def _port_in_use(proto: str, port: int) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        # SO_REUSEADDR: a TIME_WAIT leftover is not a listener we would shadow.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class PortForwarder:
    """Forwards 127.0.0.1:host_port on the host to container_ip:container_port.

    Design: a DNAT in our nft table's ``output`` nat chain, looked up in a map, so a
    forward is one map element and survives a daemon restart like the container does.
    The reply path needs ``route_localnet`` on our bridge (set by ``setup_host``; the
    firewall drops any container packet aimed at 127.0.0.0/8) and a masquerade of
    loopback sources leaving through the bridge, so the container answers the gateway.
    Only the host's IPv4 loopback is forwarded: ``localhost`` resolving to ::1 is not.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        self._fw = firewall_for(cfg)
        self._ipam = Ipam(cfg.subnet)
        self._lock = threading.Lock()

    def add(
        self, host_port: int, container_ip: str, container_port: int, proto: str = "tcp"
    ) -> PortForward:
        """Add a forward; re-adding the same one is a no-op, a different target is a Conflict."""
        if proto not in PROTOCOLS:
            raise InvalidRequest(f"protocol {proto!r} is not one of {', '.join(PROTOCOLS)}")
        _check_port(host_port, "host port")
        _check_port(container_port, "container port")
        self._ipam.check(container_ip)
        wanted = PortForward(
            proto=proto,
            host_port=host_port,
            container_ip=container_ip,
            container_port=container_port,
        )
        with self._lock:
            current = self._fw.state().forwards.get((proto, host_port))
            if current == (container_ip, container_port):
                return wanted
            if current is not None:
                raise Conflict(
                    f"{proto} port {host_port} already forwards to {current[0]}:{current[1]}"
                )
            if _port_in_use(proto, host_port):
                raise Conflict(f"{proto} port {host_port} is in use on 127.0.0.1")
            self._fw.add_forward(proto, host_port, container_ip, container_port)
        return wanted

    def remove(self, host_port: int, proto: str = "tcp") -> bool:
        """Remove a forward; False when there was none."""
        with self._lock:
            if (proto, host_port) not in self._fw.state().forwards:
                return False
            self._fw.delete(forwards={(proto, host_port)})
        return True

    def list(self) -> list[PortForward]:
        forwards = self._fw.state().forwards
        return [
            PortForward(
                proto=proto,
                host_port=host_port,
                container_ip=ip,
                container_port=port,
            )
            for (proto, host_port), (ip, port) in sorted(forwards.items())
        ]
