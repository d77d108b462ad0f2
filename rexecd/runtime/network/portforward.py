"""Host loopback ports forwarded to containers by nftables DNAT (no userspace proxy)."""

from __future__ import annotations

import errno
import socket
import threading

from rexecd.errors import Conflict, InvalidRequest, RuntimeFailure

from .firewall import PROTOCOLS, firewall_for
from .ipam import Ipam
from .models import NetworkConfig, PortForward


def _check_port(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"{what} {port} is out of range (1-65535)")


def _hold_port(proto: str, port: int) -> socket.socket:
    """A socket on 127.0.0.1:``port`` that no later bind on the host can share.

    The forward itself is a DNAT in the output hook, which a host service binding
    the port would never notice: its clients would silently reach the container.
    Holding the port makes that service's bind fail with EADDRINUSE instead, for as
    long as the forward exists. TCP: a listener, the one state no later bind can share
    (SO_REUSEADDR or not), with SO_REUSEADDR itself so a TIME_WAIT left by an earlier
    user of the port does not refuse the forward; DNAT sends every connection to the
    container, so it accepts nothing. UDP: bound without SO_REUSEADDR, which another
    socket could otherwise share. Conflict when the port is already taken.
    """
    tcp = proto == "tcp"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if tcp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        if tcp:
            sock.listen(1)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(f"{proto} port {port} is in use on 127.0.0.1") from None
        raise RuntimeFailure.from_oserror(f"hold host port {proto}/{port}", exc) from exc
    return sock


class PortForwarder:
    """Forwards 127.0.0.1:host_port on the host to container_ip:container_port.

    Design: a DNAT in our nft table's ``output`` nat chain, looked up in a map, so a
    forward is one map element and survives a daemon restart like the container does.
    The reply path needs ``route_localnet`` on our bridge (set by ``setup_host``; the
    firewall drops any container packet aimed at 127.0.0.0/8) and a masquerade of
    loopback sources leaving through the bridge, so the container answers the gateway.
    Only the host's IPv4 loopback is forwarded: ``localhost`` resolving to ::1 is not.

    While a forward exists this process holds its host port (``_hold_port``), so the
    conflict with a host service shows on the host; the holders die with the process,
    and a new daemon takes them again when it re-adds the forwards it keeps.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        self._fw = firewall_for(cfg)
        self._ipam = Ipam(cfg.subnet)
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], socket.socket] = {}

    def add(
        self, host_port: int, container_ip: str, container_port: int, proto: str = "tcp"
    ) -> PortForward:
        """Add a forward and hold its port; re-adding the same one only makes sure the
        port is held. Conflict when the port forwards elsewhere or is taken on the host."""
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
        key = (proto, host_port)
        with self._lock:
            current = self._fw.state().forwards.get(key)
            if current is not None and current != (container_ip, container_port):
                raise Conflict(
                    f"{proto} port {host_port} already forwards to {current[0]}:{current[1]}"
                )
            holder = self._held.get(key) or _hold_port(proto, host_port)
            if current is None:
                try:
                    self._fw.add_forward(proto, host_port, container_ip, container_port)
                except BaseException:
                    if key not in self._held:
                        holder.close()
                    raise
            self._held[key] = holder
        return wanted

    def remove(self, host_port: int, proto: str = "tcp") -> bool:
        """Remove a forward and free its port; False when there was no forward."""
        key = (proto, host_port)
        with self._lock:
            found = key in self._fw.state().forwards
            if found:
                self._fw.delete(forwards={key})
            self._release(key)
        return found

    def list(self) -> list[PortForward]:
        """The forwards in force. A port still held for a forward whose element went
        another way (``Network.detach`` of its container) is freed here."""
        with self._lock:
            forwards = self._fw.state().forwards
            for key in set(self._held) - set(forwards):
                self._release(key)
        return [
            PortForward(
                proto=proto,
                host_port=host_port,
                container_ip=ip,
                container_port=port,
            )
            for (proto, host_port), (ip, port) in sorted(forwards.items())
        ]

    def _release(self, key: tuple[str, int]) -> None:
        holder = self._held.pop(key, None)
        if holder is not None:
            holder.close()
