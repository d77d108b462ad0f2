"""What the daemon reads of a running container through /proc/PID: the ids of a user
name (its /etc/passwd and /etc/group), which shell it has, its network counters, and
how much its directories hold on the host.

Everything under ``/proc/PID/root`` is the tenant's to shape: paths are resolved with
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) and only regular files are read
(``users``/``safeopen``), so a FIFO or a link out of the root is an error, not a hang
or a host file. These calls still block for as long as the tenant's tree takes to
walk: the service runs them on the container's own thread (``service.tenantthreads``),
never on a pool other tenants share.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import RuntimeFailure
from rexecd.runtime.containerfs import ContainerFS
from rexecd.runtime.users import Identity, resolve_user

SHELLS = ("/bin/zsh", "/usr/bin/zsh", "/bin/bash", "/usr/bin/bash", "/bin/sh")


def root_of(pid: int) -> Path:
    return Path(f"/proc/{pid}/root")


def files(pid: int, userns_base: int, uid: int, gid: int) -> ContainerFS:
    """The container's files, written as its user (``uid``/``gid`` inside) with the
    host ids of its user namespace's range starting at ``userns_base`` (0: none)."""
    return ContainerFS(pid, userns_base + uid, userns_base + gid)


def identity(pid: int, user: str) -> Identity:
    """``user`` ("name", "uid", "user:group") resolved against the container's own
    /etc/passwd and /etc/group, as they are now."""
    return resolve_user(user, [root_of(pid)])


def find_shell(pid: int, shells: tuple[str, ...] = SHELLS) -> str:
    """The first of ``shells`` the container has (RuntimeFailure ENOENT if none)."""
    root = os.open(root_of(pid), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for shell in shells:
            try:
                fd = n.openat2(
                    root,
                    shell.lstrip("/"),
                    os.O_PATH,
                    resolve=n.RESOLVE_IN_ROOT | n.RESOLVE_NO_MAGICLINKS,
                )
            except OSError:
                continue
            os.close(fd)
            return shell
    finally:
        os.close(root)
    raise RuntimeFailure("terminal", "no shell (zsh, bash or sh) in the container", errno.ENOENT)


def net_counters(pid: int) -> tuple[int, int]:
    """Bytes received and sent on the container's non-loopback interfaces."""
    rx = tx = 0
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return 0, 0
    for line in lines:
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            continue
        fields = rest.split()
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (without following links)."""
    total = 0
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total
