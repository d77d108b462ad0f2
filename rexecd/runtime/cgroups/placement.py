"""Where our cgroups live: the daemon's own cgroup (/proc/self/cgroup) and the parent path."""

from __future__ import annotations

import posixpath
from pathlib import Path

from rexecd.errors import InvalidRequest

# On v2 a cgroup with controllers enabled for its children may hold no processes, so a
# daemon whose own (delegated) cgroup must host the containers' parent moves itself
# into this leaf first. A daemon that is already there counts its own cgroup as the
# leaf's parent, so a re-created driver resolves "relative" the same way.
DAEMON_LEAF = "daemon"


def read_proc_cgroup(text: str | None = None) -> str:
    """The text of /proc/self/cgroup, or ``text`` when given (tests)."""
    if text is not None:
        return text
    return Path("/proc/self/cgroup").read_text(encoding="utf-8")


def own_cgroups(text: str) -> dict[str, str]:
    """Map controller -> own cgroup path from /proc/self/cgroup text.

    The v2 line ("0::/path") is keyed "" ; v1 lines ("4:cpu,cpuacct:/path") give one
    key per controller; named hierarchies ("name=systemd") keep their name.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if not controllers:
            out[""] = path
        for ctrl in controllers.split(","):
            if ctrl:
                out[ctrl] = path
    return out


def strip_daemon_leaf(own: str) -> str:
    if posixpath.basename(own) == DAEMON_LEAF:
        return posixpath.dirname(own) or "/"
    return own


def resolve_parent(parent: str, own: str) -> str:
    """The absolute cgroup path ("/a/b") of ``parent``: absolute as given, or relative to
    ``own``. Refuses "..", empty and root parents: the daemon must have a cgroup of its
    own to put containers in, never the root or its own cgroup itself."""
    if not parent or any(p in ("..", ".") for p in parent.split("/")):
        raise InvalidRequest(f"invalid cgroup parent {parent!r}")
    if not parent.startswith("/"):
        parent = posixpath.join(own or "/", parent)
    resolved = posixpath.normpath(parent)
    if resolved == "/":
        raise InvalidRequest("the cgroup parent cannot be the root cgroup")
    return resolved


def under(root: Path, cgroup_path: str) -> Path:
    """The directory of ``cgroup_path`` ("/a/b") inside the hierarchy mounted at ``root``."""
    return root / cgroup_path.lstrip("/")
