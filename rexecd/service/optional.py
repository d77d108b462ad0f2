"""The daemon's optional host features as typed contracts, each with a do-nothing
implementation for a daemon configured without it: container networking
(``ContainerNetwork``/``NullNetwork``) and the port forwarder (``Forwarder``/
``NullForwarder``). The parts of the manager call them without asking whether the
feature is on (only the address lease follows ``network.enabled``, the setting the
daemon chose the implementation by); a forward is refused by ``NullForwarder`` (503).
Storage has its own pair in ``homes``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from rexecd.errors import RuntimeUnavailable

if TYPE_CHECKING:
    # Only for types: the network package pulls in pyroute2, which the daemon loads
    # only when networking is enabled.
    from rexecd.runtime.network import PortForward


class ContainerNetwork(Protocol):
    """``runtime.network.Network`` as the manager uses it."""

    def setup_host(self) -> None: ...

    def attach(
        self, container_id: str, pid: int, ip: str, mbps: int | None, group: str | None = None
    ) -> object: ...

    def detach(self, container_id: str) -> None: ...

    def reconcile(self, live_ids: set[str]) -> list[str]: ...

    def write_etc_files(
        self, rootfs_etc: int | str | os.PathLike[str], hostname: str, ip: str, dns: Sequence[str]
    ) -> None: ...


class NullNetwork:
    """Networking off: containers get a loopback only, so there is nothing to set up,
    attach or sweep."""

    def setup_host(self) -> None:
        pass

    def attach(
        self, container_id: str, pid: int, ip: str, mbps: int | None, group: str | None = None
    ) -> object:
        raise AssertionError("attach without networking: no address was leased")

    def detach(self, container_id: str) -> None:
        pass

    def reconcile(self, live_ids: set[str]) -> list[str]:
        return []

    def write_etc_files(
        self, rootfs_etc: int | str | os.PathLike[str], hostname: str, ip: str, dns: Sequence[str]
    ) -> None:
        pass


class Forwarder(Protocol):
    """``runtime.network.PortForwarder`` as ``PortForwards`` uses it."""

    def add(
        self, host_port: int, container_ip: str, container_port: int, proto: str = "tcp"
    ) -> object: ...

    def remove(self, host_port: int, proto: str = "tcp") -> bool: ...

    def list(self) -> list[PortForward]: ...


class NullForwarder:
    """Networking off: no forward can be added (503), none exists to remove."""

    def add(
        self, host_port: int, container_ip: str, container_port: int, proto: str = "tcp"
    ) -> object:
        raise RuntimeUnavailable("port forwarding needs container networking, which is off")

    def remove(self, host_port: int, proto: str = "tcp") -> bool:
        return False

    def list(self) -> list[PortForward]:
        return []
