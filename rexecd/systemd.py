"""The daemon's side of systemd's protocols, written against the sockets themselves (no
python-systemd): ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) and socket activation
(``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``).

Everything here is a no-op without systemd: no ``NOTIFY_SOCKET``, no notifications; no
``LISTEN_FDS`` meant for this process, no inherited sockets.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

# sd_listen_fds(3): passed fds start at 3.
LISTEN_FDS_START = 3


def _notify_address(value: str) -> str | bytes:
    # "@name" is an abstract socket: the leading NUL byte stands for "@".
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def notify(*fields: str) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS=...``) to systemd; False without systemd.

    A datagram per call, as sd_notify(3) does; an error (systemd gone) is not fatal to
    the daemon and returns False.
    """
    where = os.environ.get("NOTIFY_SOCKET")
    if not where or not where.startswith(("/", "@")):
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_notify_address(where))
            s.sendall(payload)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between the WATCHDOG=1 pings systemd wants (half its timeout), or None.

    ``WATCHDOG_PID``, when set, must be this process: a child never pings for us.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


@dataclass
class InheritedSocket:
    """A listening socket passed by systemd, with the name the .socket unit gave it."""

    sock: socket.socket
    name: str

    @property
    def where(self) -> str:
        """``unix:PATH`` or ``tcp:HOST:PORT``, as the ``listen`` setting spells it."""
        if self.sock.family == socket.AF_UNIX:
            path = self.sock.getsockname()
            if isinstance(path, bytes):
                path = "@" + path[1:].decode(errors="replace")
            return f"unix:{path}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


class ActivationError(ValueError):
    """The inherited fds are unusable (not a listening stream socket)."""


def listen_fds(unset_environment: bool = True) -> list[InheritedSocket]:
    """The sockets systemd passed to this process; [] when none were meant for us.

    ``LISTEN_PID`` must be our pid (the variables are inherited by children, who must
    not take our fds). The variables are removed so no child sees them. Each fd must be
    a listening SOCK_STREAM socket (``Accept=no``); anything else raises
    ``ActivationError`` naming the fd.
    """
    fds = os.environ.get("LISTEN_FDS")
    pid = os.environ.get("LISTEN_PID")
    names = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if not fds or pid != str(os.getpid()):
        return []
    try:
        count = int(fds)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds!r} is not a number") from None
    labels = names.split(":") if names else []
    out: list[InheritedSocket] = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS: fd {fd} is not a socket: {exc.strerror}") from None
        os.set_inheritable(fd, False)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            with contextlib.suppress(OSError):
                sock.detach()
            raise ActivationError(
                f"LISTEN_FDS: fd {fd} is not a listening stream socket (the .socket unit "
                "needs Accept=no and ListenStream=)"
            )
        label = labels[i] if i < len(labels) else "unknown"
        out.append(InheritedSocket(sock, label))
    return out
