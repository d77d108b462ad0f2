"""Typed messages between the runtime, the spawner and container children over SEQPACKET sockets.

Each message is one datagram of JSON, optionally carrying file descriptors with
SCM_RIGHTS. A child signals a successful ``execve`` by the socket closing (its end
is close-on-exec); a failure is a ``ChildError`` naming the step.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, is_dataclass
from typing import Any

MAX_MSG = 1 << 20
MAX_FDS = 8


@dataclass(frozen=True)
class Ready:
    """The child has unshared its namespaces; the caller may configure them (network)."""

    type: str = "ready"


@dataclass(frozen=True)
class Go:
    """The caller finished its part; the child may exec."""

    type: str = "go"


@dataclass(frozen=True)
class ChildError:
    """A step in the child failed; ``errno`` is the kernel's answer when there was one."""

    step: str
    errno: int | None
    message: str
    type: str = "error"


@dataclass(frozen=True)
class PtyMaster:
    """The PTY master the child allocated in the container's devpts (fd attached)."""

    pts: str
    type: str = "pty"


@dataclass(frozen=True)
class Request:
    """A request to the spawner: ``op`` is ``run`` or ``exec``; ``body`` the JSON spec."""

    op: str
    rid: int
    body: dict[str, Any] = field(default_factory=dict)
    type: str = "request"


@dataclass(frozen=True)
class Reply:
    """The spawner's answer: the host pid of the container init / exec'd process."""

    rid: int
    pid: int | None
    error: str | None = None
    type: str = "reply"


@dataclass(frozen=True)
class Exited:
    """A process the spawner reaped: ``status`` is the exit code, or 128 + signal."""

    pid: int
    status: int
    type: str = "exited"


@dataclass(frozen=True)
class Holder:
    """A user namespace holder of the spawner (see userns.fork_holder) is alive, its
    pidfd attached: sent by the holder itself before it does anything else, so the
    daemon knows every holder that may outlive the spawner and reaps it then. With
    ``reaped`` (from the spawner): it is gone, the pidfd may be closed."""

    pid: int
    reaped: bool = False
    type: str = "holder"


Message = Ready | Go | ChildError | PtyMaster | Request | Reply | Exited | Holder

_TYPES: dict[str, type[Any]] = {
    "ready": Ready,
    "go": Go,
    "error": ChildError,
    "pty": PtyMaster,
    "request": Request,
    "reply": Reply,
    "exited": Exited,
    "holder": Holder,
}


def plain(obj: object) -> dict[str, Any]:
    """A dataclass's fields as they stand, nested ones left to json's ``default`` hook:
    no copy of the values (``dataclasses.asdict`` deep-copies every leaf, 0.3 ms for a
    container spec, twice per start)."""
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    return dict(vars(obj))


def dumps(obj: object) -> str:
    """Compact JSON of ``obj``, dataclasses (nested too) as objects of their fields."""
    return json.dumps(obj, separators=(",", ":"), default=plain)


def encode(msg: Message) -> bytes:
    return dumps(msg).encode()


def decode(raw: bytes) -> Message:
    data = json.loads(raw)
    cls = _TYPES.get(data.get("type"))
    if cls is None:
        raise ValueError(f"unknown sync message type {data.get('type')!r}")
    msg: Message = cls(**data)
    return msg


def send(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [encode(msg)], fds)
    else:
        sock.send(encode(msg))


def recv(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Receive one message; ``(None, [])`` means the peer closed (or exec'd)."""
    raw, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
    if not raw:
        for fd in fds:
            os.close(fd)
        return None, []
    return decode(raw), fds


def exit_status(wait_status: int) -> int:
    """A waitpid status as a shell would report it: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)
