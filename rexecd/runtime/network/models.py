"""Data shapes of the container network: daemon settings, attachments, port forwards."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator


class NetworkConfig(BaseModel):
    """One daemon's network. Several daemons may share a host when all three names differ."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bridge: str = "rexec0"
    subnet: str = "10.88.0.0/16"
    nft_table: str = "rexecd"
    # Host ports containers may reach on the gateway address (a DNS forwarder, a
    # metadata service...). Everything else on the host, the daemon's own port
    # included, is dropped. Empty by default: we run no such service today, and a
    # resolver the host happens to run must not be exposed to containers.
    gateway_tcp_ports: tuple[int, ...] = ()
    gateway_udp_ports: tuple[int, ...] = ()
    # Connections (host conntrack entries) one container address may hold at once.
    max_flows: int = 4096

    @field_validator("gateway_tcp_ports", "gateway_udp_ports")
    @classmethod
    def _ports_in_range(cls, ports: tuple[int, ...]) -> tuple[int, ...]:
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is out of range (1-65535)")
        return ports


class Attachment(BaseModel):
    """A container's place on the bridge, as ``Network.attach`` made it."""

    model_config = ConfigDict(frozen=True)

    container_id: str
    host_ifname: str
    ip: str
    prefixlen: int
    gateway: str
    mac: str | None
    mbps: int | None
    group: str | None = None


class PortForward(BaseModel):
    """A host loopback port answered by a container: 127.0.0.1:host_port -> ip:port."""

    model_config = ConfigDict(frozen=True)

    proto: Literal["tcp", "udp"] = "tcp"
    host_port: int
    container_ip: str
    container_port: int
