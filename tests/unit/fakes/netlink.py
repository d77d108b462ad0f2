"""Recording fakes of the container network's kernel side: ``FakeNetlink`` (a
``NetlinkOpener`` over in-memory network namespaces) and ``FakeFirewall`` (the nft
sets ``Network`` keeps per port).

Every request that changes state is appended to ``FakeNetlink.calls`` as a ``Call``
naming the namespace it went to ("host" or "netns:PID"), the method and its
arguments; lookups are not recorded. The namespaces hold links (a veth's two ends die
together, as the kernel's do), addresses, routes and tc objects, and answer like the
kernel where ``Network`` depends on it: a missing link or qdisc is ``NetlinkError``
ENODEV/ENOENT, an existing name EEXIST.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rexecd.runtime.network.firewall import FirewallState, Port
from rexecd.runtime.network.netlink import Addr, Link, NetlinkError


@dataclass
class Call:
    ns: str
    name: str
    args: dict[str, Any]


@dataclass
class _Link:
    index: int
    name: str
    kind: str | None
    master: int | None = None
    group: int = 0
    alias: str | None = None
    up: bool = False
    isolated: bool = False
    mac: str | None = None
    peer: tuple[FakeNamespace, int] | None = None


@dataclass
class FakeNamespace:
    """One network namespace (``table``: its links by index); also the ``Netlink``
    session opened in it."""

    name: str
    owner: FakeNetlink
    table: dict[int, _Link] = field(default_factory=dict)
    addresses: list[Addr] = field(default_factory=list)
    routes: list[tuple[str, str, int]] = field(default_factory=list)
    # (index, parent) -> kind and parameters
    qdiscs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    filters: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._indexes = itertools.count(1)
        self.add_link("lo", None)

    # -- test set-up and inspection ----------------------------------------------------

    def add_link(self, name: str, kind: str | None, **attrs: Any) -> int:
        index = next(self._indexes)
        self.table[index] = _Link(index, name, kind, **attrs)
        return index

    def by_name(self, name: str) -> _Link | None:
        return next((lk for lk in self.table.values() if lk.name == name), None)

    def names(self) -> set[str]:
        return {lk.name for lk in self.table.values()}

    # -- internals ---------------------------------------------------------------------

    def _do(self, method: str, /, **args: Any) -> None:
        self.owner._record(Call(self.name, method, args))

    def _link(self, index: int) -> _Link:
        if index not in self.table:
            raise NetlinkError(errno.ENODEV, "No such device")
        return self.table[index]

    def _new(self, name: str) -> None:
        if self.by_name(name) is not None:
            raise NetlinkError(errno.EEXIST, "File exists")

    # -- Netlink: lookups --------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        link = self.by_name(name)
        return link.index if link else None

    def get_link(self, name: str) -> Link | None:
        lk = self.by_name(name)
        if lk is None:
            return None
        return Link(lk.index, lk.name, lk.kind, lk.master, lk.group, lk.alias)

    def links(self) -> list[Link]:
        return [
            Link(lk.index, lk.name, lk.kind, lk.master, lk.group, lk.alias)
            for lk in self.table.values()
        ]

    def addrs(self, index: int | None = None) -> list[Addr]:
        return [a for a in self.addresses if index is None or a.index == index]

    def root_tbf_rate(self, index: int) -> int | None:
        q = self.qdiscs.get((index, 0xFFFFFFFF))
        if q is None or q["kind"] != "tbf":
            return None
        return int(q["rate"].removesuffix("mbit")) * 125_000

    # -- Netlink: requests -------------------------------------------------------------

    def add_bridge(self, name: str, mac: str) -> None:
        self._do("add_bridge", name=name, mac=mac)
        self._new(name)
        self.add_link(name, "bridge", mac=mac)

    def add_veth(
        self, name: str, *, master: int, group: int, peer: str, peer_netns_fd: int, peer_mac: str
    ) -> None:
        self._do(
            "add_veth",
            name=name,
            master=master,
            group=group,
            peer=peer,
            peer_netns_fd=peer_netns_fd,
            peer_mac=peer_mac,
        )
        self._new(name)
        self._link(master)
        other = self.owner.by_fd(peer_netns_fd)
        other._new(peer)
        theirs = other.add_link(peer, "veth", mac=peer_mac)
        ours = self.add_link(name, "veth", master=master, group=group)
        self.table[ours].peer = (other, theirs)
        other.table[theirs].peer = (self, ours)

    def add_ifb(self, name: str) -> None:
        self._do("add_ifb", name=name)
        self._new(name)
        self.add_link(name, "ifb")

    def set_link(self, index: int, *, alias: str | None = None, up: bool = False) -> None:
        self._do("set_link", index=index, alias=alias, up=up)
        link = self._link(index)
        if alias is not None:
            link.alias = alias
        link.up = link.up or up

    def set_isolated(self, index: int, isolated: bool) -> None:
        self._do("set_isolated", index=index, isolated=isolated)
        self._link(index).isolated = isolated

    def del_link(self, index: int) -> None:
        self._do("del_link", index=index)
        link = self.table.pop(self._link(index).index)
        self.addresses = [a for a in self.addresses if a.index != index]
        self.qdiscs = {k: v for k, v in self.qdiscs.items() if k[0] != index}
        if link.peer is not None:
            ns, peer = link.peer
            ns.table.pop(peer, None)

    def add_addr(self, index: int, address: str, prefixlen: int) -> None:
        self._do("add_addr", index=index, address=address, prefixlen=prefixlen)
        self._link(index)
        self.addresses.append(Addr(index, address, prefixlen))

    def add_default_route(self, gateway: str, oif: int) -> None:
        self._do("add_default_route", gateway=gateway, oif=oif)
        self._link(oif)
        self.routes.append(("0.0.0.0/0", gateway, oif))

    def replace_tbf(self, index: int, handle: int, *, rate: str, burst: int, latency: str) -> None:
        self._do("replace_tbf", index=index, handle=handle, rate=rate, burst=burst, latency=latency)
        self._link(index)
        self.qdiscs[(index, 0xFFFFFFFF)] = {"kind": "tbf", "rate": rate, "handle": handle}

    def del_qdisc(self, index: int, parent: int) -> None:
        self._do("del_qdisc", index=index, parent=parent)
        self._link(index)
        if self.qdiscs.pop((index, parent), None) is None:
            raise NetlinkError(errno.ENOENT, "No such file or directory")
        if parent == 0xFFFFFFF1:
            self.filters = [f for f in self.filters if f["index"] != index]

    def add_ingress(self, index: int, handle: int) -> None:
        self._do("add_ingress", index=index, handle=handle)
        self._link(index)
        self.qdiscs[(index, 0xFFFFFFF1)] = {"kind": "ingress", "handle": handle}

    def redirect_all(
        self, index: int, *, parent: int, prio: int, protocol: int, classid: int, to_index: int
    ) -> None:
        args = dict(parent=parent, prio=prio, protocol=protocol, classid=classid, to_index=to_index)
        self._do("redirect_all", index=index, **args)
        self._link(index)
        self._link(to_index)
        if self.qdiscs.get((index, 0xFFFFFFF1), {}).get("handle") != parent:
            raise NetlinkError(errno.EINVAL, "Invalid argument: no qdisc at the filter's parent")
        self.filters.append({"index": index, **args})


@dataclass
class FakeNetns:
    pid: int
    fd: int
    ns: FakeNamespace
    owner: FakeNetlink

    @contextmanager
    def session(self) -> Iterator[FakeNamespace]:
        self.owner.sessions_open += 1
        try:
            yield self.ns
        finally:
            self.owner.sessions_open -= 1


@dataclass
class FakeNetlink:
    """The ``NetlinkOpener`` of a fake host: ``host`` and one namespace per pid."""

    calls: list[Call] = field(default_factory=list)
    failures: list[tuple[Callable[[Call], bool], Exception]] = field(default_factory=list)
    sessions_open: int = 0

    def __post_init__(self) -> None:
        self.host_ns = FakeNamespace("host", self)
        self.netns_by_pid: dict[int, FakeNamespace] = {}

    def fail(self, when: Callable[[Call], bool], exc: Exception) -> None:
        """Raise ``exc`` from the first request ``when`` accepts (it is still recorded)."""
        self.failures.append((when, exc))

    def _record(self, call: Call) -> None:
        self.calls.append(call)
        for when, exc in self.failures:
            if when(call):
                self.failures.remove((when, exc))
                raise exc

    def container(self, pid: int) -> FakeNamespace:
        if pid not in self.netns_by_pid:
            self.netns_by_pid[pid] = FakeNamespace(f"netns:{pid}", self)
        return self.netns_by_pid[pid]

    def by_fd(self, fd: int) -> FakeNamespace:
        for pid, ns in self.netns_by_pid.items():
            if 1000 + pid == fd:
                return ns
        raise NetlinkError(errno.EBADF, "Bad file descriptor")

    def where(self, ns: str) -> list[tuple[str, dict[str, Any]]]:
        return [(c.name, c.args) for c in self.calls if c.ns == ns]

    # -- NetlinkOpener -----------------------------------------------------------------

    @contextmanager
    def host(self) -> Iterator[FakeNamespace]:
        self.sessions_open += 1
        try:
            yield self.host_ns
        finally:
            self.sessions_open -= 1

    @contextmanager
    def netns(self, pid: int) -> Iterator[FakeNetns]:
        self.sessions_open += 1
        try:
            yield FakeNetns(pid, 1000 + pid, self.container(pid), self)
        finally:
            self.sessions_open -= 1


@dataclass
class FakeFirewall:
    """The per-port nft elements of ``Firewall``, kept in memory; calls recorded."""

    ports: dict[Port, int] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    fail_add: Exception | None = None

    def add_port(self, port: Port, group: int) -> None:
        self.calls.append(("add_port", (port, group)))
        if self.fail_add is not None:
            raise self.fail_add
        self.ports[port] = group

    def delete(
        self,
        ports: Iterable[Port] = (),
        names: Iterable[str] = (),
        groups: Iterable[int] = (),
        forwards: Iterable[tuple[str, int]] = (),
    ) -> None:
        ports, names, groups = set(ports), set(names), set(groups)
        self.calls.append(("delete", (ports, names, groups, set(forwards))))
        for p in list(self.ports):
            if p in ports or p.ifname in names:
                del self.ports[p]

    def state(self, bridge: bool = True) -> FirewallState:
        return FirewallState(
            ports=set(self.ports),
            names={p.ifname for p in self.ports},
            groups={g for g in self.ports.values() if g},
            present=True,
        )
