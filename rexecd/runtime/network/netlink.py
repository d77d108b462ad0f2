"""pyroute2 sessions on the host and inside a container's netns, and netlink error translation."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from errno import EEXIST, EINVAL, ENODEV, ENOENT
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from rexecd import _native
from rexecd.errors import InvalidRequest, RuntimeFailure

__all__ = [
    "EEXIST",
    "EINVAL",
    "ENODEV",
    "ENOENT",
    "ContainerNetns",
    "failure",
    "host_session",
    "is_missing",
    "link_index",
    "translate",
]


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
def host_session() -> Iterator[Any]:
    """An IPRoute on the daemon's own netns, subscribed to no multicast group: we only
    send requests, and event broadcasts would just fill the socket buffer."""
    with translate("netlink", "open rtnetlink socket"):
        ipr = IPRoute(groups=0)
    try:
        yield ipr
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
    def session(self) -> Iterator[Any]:
        """An IPRoute whose requests act inside the container's namespace."""
        with translate("netns", f"rtnetlink socket in netns of pid {self.pid}"):
            fd = self._netlink_socket()
            try:
                ipr = IPRoute(groups=0, fileno=fd)
            except BaseException:
                os.close(fd)
                raise
        try:
            yield ipr
        finally:
            ipr.close()


def link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def delete_link(ipr: Any, index: int | None, name: str, step: str) -> bool:
    """Delete the link ``index`` (``name`` for errors); False if it was already gone."""
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except Exception as exc:
        if not is_missing(exc):
            raise failure(step, name, exc) from exc
        return False
    return True
