"""One owner per host resource: the state dir's lock, and the owner marks on the
cgroup parent, the nft tables and the bridge.

A daemon takes an exclusive ``flock`` on ``STATE_DIR/daemon.lock`` (its pid written
inside) for as long as it runs: a second daemon on the same state dir refuses to start
and names the holder. The state dir has an id (``STATE_DIR/owner-id``, made once); the
host resources a daemon manages carry a mark naming that id and the state dir:

* the cgroup parent directories: the ``trusted.rexecd.owner`` xattr (root only);
* the nft tables: the table's comment (set when the table is made; nft keeps the first);
* the bridge: its interface alias.

Before touching any of them a daemon reads the marks. A mark of another state dir
whose lock is held (another live daemon) stops start-up with the holder's pid, and
nothing is changed: the other daemon's containers would otherwise be "orphans" to
reconcile away. A mark of a state dir nobody holds is taken over, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rexecd.errors import RuntimeUnavailable

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"
ID_NAME = "owner-id"
XATTR = "trusted.rexecd.owner"
_MARK = re.compile(r"rexecd-owner id=([0-9a-f]{32}) dir=(/[A-Za-z0-9_./+-]*)\Z")
# A mark must fit an nft comment (128 bytes) and go inside its double quotes.
_SAFE_DIR = re.compile(r"/[A-Za-z0-9_./+-]{0,80}\Z")


@dataclass(frozen=True)
class Owner:
    """The state dir a resource belongs to."""

    id: str
    state_dir: str

    def mark(self) -> str:
        return f"rexecd-owner id={self.id} dir={self.state_dir}"

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        m = _MARK.fullmatch((text or "").strip())
        return cls(m.group(1), m.group(2)) if m else None


class StateDirLock:
    """The exclusive lock on a state dir; held until ``release`` or the process exits."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "another process"
            raise RuntimeUnavailable(
                f"state dir {state_dir} is in use by rexecd ({who}): one daemon per state dir"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None


def holder(state_dir: str) -> int | None:
    """The pid of the daemon holding ``state_dir``'s lock (0 if unknown), None if free."""
    try:
        fd = os.open(Path(state_dir) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    finally:
        os.close(fd)
    return None


def state_owner(state_dir: Path) -> Owner:
    """This state dir's owner identity, its id made on first use."""
    path = state_dir / ID_NAME
    try:
        sid = path.read_text().strip()
    except FileNotFoundError:
        sid = ""
    if not re.fullmatch(r"[0-9a-f]{32}", sid):
        sid = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        tmp.write_text(sid + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    where = str(state_dir)
    return Owner(sid, where if _SAFE_DIR.fullmatch(where) else "/")


@dataclass
class Resource:
    """One host resource with an owner mark: how to read it and how to write it."""

    what: str
    read: Callable[[], str | None]
    write: Callable[[str], None]


def cgroup_resource(directory: Path) -> Resource:
    def read() -> str | None:
        try:
            return os.getxattr(directory, XATTR).decode(errors="replace")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    def write(mark: str) -> None:
        try:
            os.setxattr(directory, XATTR, mark.encode())
        except OSError as exc:
            # A kernel without xattrs on cgroupfs: the parent goes unmarked.
            log.warning("cannot mark cgroup %s as ours: %s", directory, exc.strerror)

    return Resource(f"cgroup parent {directory}", read, write)


_COMMENT = re.compile(r'^\tcomment "([^"]*)"$', re.MULTILINE)


def nft_resource(family: str, table: str) -> Resource:
    """An nft table; its comment can only be given when it is made, so ``write`` makes
    the (empty) table with the mark if it does not exist, and leaves an existing one."""

    def read() -> str | None:
        proc = subprocess.run(
            ["nft", "list", "table", family, table],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            return None
        head = proc.stdout.split("\tchain ", 1)[0].split("\tset ", 1)[0]
        m = _COMMENT.search(head)
        return m.group(1) if m else None

    def write(mark: str) -> None:
        subprocess.run(
            ["nft", f'add table {family} {table} {{ comment "{mark}" ; }}'],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

    return Resource(f"nft table {family} {table}", read, write)


def bridge_resource(name: str) -> Resource:
    def read() -> str | None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                return None
            alias = ipr.get_links(idx[0])[0].get_attr("IFLA_IFALIAS")
            return str(alias) if alias else None

    def write(mark: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                ipr.link("set", index=idx[0], ifalias=mark)

    return Resource(f"bridge {name}", read, write)


def check(resources: list[Resource], me: Owner) -> None:
    """Refuse (``RuntimeUnavailable``) if any resource is marked by another live daemon.

    Reads only: nothing is changed, whatever the outcome.
    """
    for res in resources:
        other = Owner.parse(res.read())
        if other is None or other.id == me.id:
            continue
        pid = holder(other.state_dir)
        if pid is not None:
            who = f"pid {pid}" if pid else "a running daemon"
            raise RuntimeUnavailable(
                f"{res.what} belongs to the rexecd of {other.state_dir} ({who}); "
                "give this daemon its own (--cgroup-parent, --nft-table, --bridge)"
            )
        log.warning(
            "%s was marked by the rexecd of %s, which is not running: taking it over",
            res.what,
            other.state_dir,
        )


def claim(resources: list[Resource], me: Owner) -> None:
    """Put this daemon's mark on each resource (after ``check`` passed)."""
    for res in resources:
        with contextlib.suppress(subprocess.CalledProcessError):
            if Owner.parse(res.read()) != me:
                res.write(me.mark())
