"""The netlink seam: a typed ``Netlink`` session, its pyroute2 implementation, the host
and container-netns sessions, and netlink error translation.

Everything in this package that talks rtnetlink does it through ``Netlink`` (one
session in one network namespace) and ``NetlinkOpener`` (how sessions are opened), so
the veth, address, route and tc requests have unit tests against a recording fake
(tests/unit/fakes/netlink.py). Only this module imports pyroute2's request API. Each
method sends the one request it is named after; errors are pyroute2's ``NetlinkError``
(``code`` is the errno) or ``OSError``, which ``translate``/``failure`` turn into
``RuntimeFailure``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from errno import EEXIST, EINVAL, ENODEV, ENOENT
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from rexecd import _native
from rexecd.errors import InvalidRequest, RuntimeFailure

__all__ = [
    "EEXIST",
    "EINVAL",
    "ENODEV",
    "ENOENT",
    "Addr",
    "ContainerNetns",
    "Link",
    "Netlink",
    "NetlinkError",
    "NetlinkOpener",
    "Netns",
    "Pyroute2Opener",
    "PyrouteNetlink",
    "delete_link",
    "failure",
    "host_session",
    "is_missing",
    "translate",
]

# tc handles (linux/pkt_sched.h).
TC_H_ROOT = 0xFFFFFFFF


@dataclass(frozen=True)
class Link:
    """The few attributes of a link that our bookkeeping reads."""

    index: int
    name: str
    kind: str | None
    master: int | None
    group: int
    alias: str | None


@dataclass(frozen=True)
class Addr:
    """One IPv4 address of a link."""

    index: int
    address: str
    prefixlen: int


class Netlink(Protocol):
    """The rtnetlink requests of the container network, in one network namespace."""

    def link_index(self, name: str) -> int | None:
        """The index of link ``name``, None when there is none."""
        ...

    def get_link(self, name: str) -> Link | None:
        """Link ``name``; None when the kernel says it does not exist."""
        ...

    def links(self) -> list[Link]: ...

    def addrs(self, index: int | None = None) -> list[Addr]:
        """The IPv4 addresses of link ``index`` (of every link with None)."""
        ...

    def add_bridge(self, name: str, mac: str) -> None: ...

    def add_veth(
        self, name: str, *, master: int, group: int, peer: str, peer_netns_fd: int, peer_mac: str
    ) -> None:
        """A veth pair: ``name`` enslaved to ``master`` in device group ``group``, its
        peer made directly inside the namespace of ``peer_netns_fd``."""
        ...

    def add_ifb(self, name: str) -> None: ...

    def set_link(self, index: int, *, alias: str | None = None, up: bool = False) -> None:
        """One request setting the alias (when given) and/or the up state (when True)."""
        ...

    def set_isolated(self, index: int, isolated: bool) -> None:
        """The bridge port flag ``isolated`` of link ``index``."""
        ...

    def del_link(self, index: int) -> None: ...

    def add_addr(self, index: int, address: str, prefixlen: int) -> None: ...

    def add_default_route(self, gateway: str, oif: int) -> None: ...

    def replace_tbf(self, index: int, handle: int, *, rate: str, burst: int, latency: str) -> None:
        """A root tbf qdisc with ``handle`` on link ``index``, replacing any root qdisc."""
        ...

    def del_qdisc(self, index: int, parent: int) -> None: ...

    def add_ingress(self, index: int, handle: int) -> None: ...

    def redirect_all(
        self, index: int, *, parent: int, prio: int, protocol: int, classid: int, to_index: int
    ) -> None:
        """A u32 match-all filter under ``parent`` whose mirred action redirects every
        packet to the egress of link ``to_index``."""
        ...

    def root_tbf_rate(self, index: int) -> int | None:
        """The rate in bytes/s of the tbf at link ``index``'s root; None without one."""
        ...


class Netns(Protocol):
    """A pinned reference to a container's network namespace."""

    @property
    def pid(self) -> int: ...

    @property
    def fd(self) -> int: ...

    def session(self) -> AbstractContextManager[Netlink]: ...


class NetlinkOpener(Protocol):
    """Where ``Network`` gets its sessions: the host's, and a container's namespace."""

    def host(self) -> AbstractContextManager[Netlink]: ...

    def netns(self, pid: int) -> AbstractContextManager[Netns]: ...


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


class PyrouteNetlink:
    """``Netlink`` over a pyroute2 ``IPRoute``."""

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr

    def link_index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def get_link(self, name: str) -> Link | None:
        try:
            msgs = self.ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if is_missing(exc):
                return None
            raise
        return _link(msgs[0]) if msgs else None

    def links(self) -> list[Link]:
        return [_link(msg) for msg in self.ipr.get_links()]

    def addrs(self, index: int | None = None) -> list[Addr]:
        query: dict[str, Any] = {"family": socket.AF_INET}
        if index is not None:
            query["index"] = index
        return [
            Addr(int(msg["index"]), str(msg.get_attr("IFA_ADDRESS")), int(msg["prefixlen"]))
            for msg in self.ipr.get_addr(**query)
        ]

    def add_bridge(self, name: str, mac: str) -> None:
        self.ipr.link("add", ifname=name, kind="bridge", address=mac)

    def add_veth(
        self, name: str, *, master: int, group: int, peer: str, peer_netns_fd: int, peer_mac: str
    ) -> None:
        self.ipr.link(
            "add",
            ifname=name,
            kind="veth",
            master=master,
            group=group,
            peer={"ifname": peer, "net_ns_fd": peer_netns_fd, "address": peer_mac},
        )

    def add_ifb(self, name: str) -> None:
        self.ipr.link("add", ifname=name, kind="ifb")

    def set_link(self, index: int, *, alias: str | None = None, up: bool = False) -> None:
        attrs: dict[str, Any] = {}
        if alias is not None:
            attrs["ifalias"] = alias
        if up:
            attrs["state"] = "up"
        self.ipr.link("set", index=index, **attrs)

    def set_isolated(self, index: int, isolated: bool) -> None:
        self.ipr.brport("set", index=index, isolated=1 if isolated else 0)

    def del_link(self, index: int) -> None:
        self.ipr.link("del", index=index)

    def add_addr(self, index: int, address: str, prefixlen: int) -> None:
        self.ipr.addr("add", index=index, address=address, prefixlen=prefixlen)

    def add_default_route(self, gateway: str, oif: int) -> None:
        self.ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=oif)

    def replace_tbf(self, index: int, handle: int, *, rate: str, burst: int, latency: str) -> None:
        self.ipr.tc("replace", "tbf", index, handle, rate=rate, burst=burst, latency=latency)

    def del_qdisc(self, index: int, parent: int) -> None:
        # No kind: pyroute2 would want the tbf rate parameters even to delete one.
        self.ipr.tc("del", index=index, parent=parent)

    def add_ingress(self, index: int, handle: int) -> None:
        self.ipr.tc("add", "ingress", index, handle)

    def redirect_all(
        self, index: int, *, parent: int, prio: int, protocol: int, classid: int, to_index: int
    ) -> None:
        self.ipr.tc(
            "add-filter",
            "u32",
            index,
            parent=parent,
            prio=prio,
            protocol=protocol,
            target=classid,
            keys=["0x0/0x0+0"],
            action={
                "kind": "mirred",
                "direction": "egress",
                "action": "redirect",
                "ifindex": to_index,
            },
        )

    def root_tbf_rate(self, index: int) -> int | None:
        for msg in self.ipr.get_qdiscs(index=index):
            if msg.get_attr("TCA_KIND") != "tbf" or msg["parent"] != TC_H_ROOT:
                continue
            opts = msg.get_attr("TCA_OPTIONS")
            parms = opts.get_attr("TCA_TBF_PARMS") if opts is not None else None
            if parms is not None:
                return int(parms["rate"])
        return None


def failure(step: str, what: str, exc: BaseException) -> RuntimeFailure:
    """A RuntimeFailure for a netlink or OS error, naming the step and the object."""
    if isinstance(exc, NetlinkError):
        detail = exc.args[-1] if exc.args else str(exc)
        return RuntimeFailure(step, f"{what}: {detail}", exc.code)
    if isinstance(exc, OSError):
        return RuntimeFailure(step, f"{what}: {exc.strerror or exc}", exc.errno)
    return RuntimeFailure(step, f"{what}: {exc}")


@contextmanager
def translate(step: str, what: str) -> Iterator[None]:
    """Turn netlink and OS errors raised inside the block into RuntimeFailure."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        raise failure(step, what, exc) from exc


def is_missing(exc: BaseException, *extra: int) -> bool:
    """True for the netlink answers that mean 'already gone' (for idempotent removal)."""
    return isinstance(exc, NetlinkError) and exc.code in (ENOENT, ENODEV, *extra)


@contextmanager
def host_session() -> Iterator[Netlink]:
    """An IPRoute on the daemon's own netns, subscribed to no multicast group: we only
    send requests, and event broadcasts would just fill the socket buffer."""
    with translate("netlink", "open rtnetlink socket"):
        ipr = IPRoute(groups=0)
    try:
        yield PyrouteNetlink(ipr)
    finally:
        ipr.close()


class ContainerNetns:
    """An open reference to the network namespace of a container's init process.

    Holding the fd pins the namespace, so a pid reused between our checks and our
    requests cannot redirect them to another process's namespace.
    """

    def __init__(self, pid: int) -> None:
        path = f"/proc/{pid}/ns/net"
        with translate("netns", f"open {path}"):
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            theirs = os.fstat(self.fd)
            ours = os.stat("/proc/self/ns/net")
        except OSError as exc:
            os.close(self.fd)
            raise RuntimeFailure.from_oserror("netns", exc) from exc
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            os.close(self.fd)
            # Configuring "eth0" here would rename and readdress a host interface.
            raise InvalidRequest(f"pid {pid} shares the daemon's network namespace")
        self.pid = pid

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ContainerNetns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netlink_socket(self) -> int:
        # setns(2) moves only the calling thread. A throwaway thread enters the
        # namespace, opens the socket (which stays bound to that namespace) and dies
        # there, so no daemon thread ever runs in a container's namespace. pyroute2's
        # own netns support forks, which a threaded daemon must not do.
        result: dict[str, Any] = {}

        def enter() -> None:
            try:
                _native.setns(self.fd, _native.CLONE_NEWNET)
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
                result["fd"] = sock.detach()
            except OSError as exc:
                result["error"] = exc

        worker = threading.Thread(target=enter, name=f"netns-{self.pid}", daemon=True)
        worker.start()
        worker.join()
        if "error" in result:
            raise result["error"]
        return int(result["fd"])

    @contextmanager
    def session(self) -> Iterator[Netlink]:
        """An IPRoute whose requests act inside the container's namespace."""
        with translate("netns", f"rtnetlink socket in netns of pid {self.pid}"):
            fd = self._netlink_socket()
            try:
                ipr = IPRoute(groups=0, fileno=fd)
            except BaseException:
                os.close(fd)
                raise
        try:
            yield PyrouteNetlink(ipr)
        finally:
            ipr.close()


class Pyroute2Opener:
    """The real sessions: pyroute2 on the host and in a container's namespace."""

    def host(self) -> AbstractContextManager[Netlink]:
        return host_session()

    def netns(self, pid: int) -> AbstractContextManager[Netns]:
        return ContainerNetns(pid)


def delete_link(nl: Netlink, index: int | None, name: str, step: str) -> bool:
    """Delete the link ``index`` (``name`` for errors); False if it was already gone."""
    if index is None:
        return False
    try:
        nl.del_link(index)
    except Exception as exc:
        if not is_missing(exc):
            raise failure(step, name, exc) from exc
        return False
    return True
