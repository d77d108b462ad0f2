"""User namespaces: a container's root mapped to an unprivileged host id range.

The spawner (real root, single-threaded) makes each container's user namespace with a
short-lived *holder*: a fork that unshares a user namespace together with the network,
UTS and IPC namespaces it then owns, and blocks. From outside, the spawner writes
``uid_map``/``gid_map`` (``0 BASE SIZE``), opens the four namespace files and lets the
holder go. The spawner keeps one holder made ahead (a spare, made when requests pause),
so that a start does not wait for the fork and unshare; a holder dies with the spawner
(PDEATHSIG), and tells the daemon its pidfd first, so that the daemon, a child
subreaper that inherits it then, reaps it.

The container child joins net/uts/ipc as host root, unshares its mount and cgroup
namespaces (owned by the initial user namespace: the container can never mount
or unmount anything there), builds its root with the image layers idmapped through
the new user namespace, and joins the user namespace last, just before it drops
privileges and execs. Capabilities then apply to what that user namespace owns: its
network (``lo``, raw sockets), UTS and IPC namespaces, and files in its range.

On the host, everything a container writes (overlay upper dir, /home/user) is owned by
ids in its range; ``shift_tree`` moves a tree into a range (done once, when the range
it was written in is not the container's). Ranges are aligned on ``size`` above
``base``, so the in-container id of a host id is ``(id - base) % size``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import InvalidRequest
from rexecd.runtime import sync
from rexecd.runtime.spec import UsernsSpec

# Namespaces the holder creates and the container joins: owned by the new user namespace.
OWNED_NS = n.CLONE_NEWNET | n.CLONE_NEWUTS | n.CLONE_NEWIPC
# Past any descriptor a holder may have inherited (closerange stops at the table's end).
MAX_FD = 1 << 20
# A holder's name in ps and /proc/PID/comm.
HOLDER_NAME = "rexecd-userns"


@dataclass(frozen=True)
class UsernsFds:
    """Open fds of a new container's user namespace and the namespaces it owns."""

    user: int
    net: int
    uts: int
    ipc: int

    def all(self) -> list[int]:
        return [self.user, self.net, self.uts, self.ipc]

    def close(self) -> None:
        for fd in self.all():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class IdRanges:
    """The host ids set aside for containers: ``count`` ranges of ``size`` from ``base``."""

    base: int
    size: int
    count: int

    def range(self, slot: int) -> UsernsSpec:
        if not 0 <= slot < self.count:
            raise ValueError(f"id range slot {slot} is outside 0..{self.count - 1}")
        return UsernsSpec(base=self.base + slot * self.size, size=self.size)


def _write_map(pid: int, name: str, rng: UsernsSpec) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, f"0 {rng.base} {rng.size}\n".encode())
    finally:
        os.close(fd)


class Holder:
    """A forked process that has unshared a new user namespace with the namespaces it
    owns (``OWNED_NS``) and waits, unmapped, until ``namespaces`` maps it to a range and
    opens its namespaces; then it exits by itself. Made ahead of need (the spawner's
    spare) or at a start."""

    def __init__(self, pid: int, ready: int, release: int) -> None:
        self.pid = pid
        self._ready = ready  # reads "u" once the holder has unshared
        self._release = release  # closing it (EOF) lets the holder exit

    def namespaces(self, rng: UsernsSpec) -> UsernsFds:
        """Map the holder's user namespace to ``rng`` and open its four namespaces.
        Once only: the holder is released whatever happens."""
        try:
            if os.read(self._ready, 1) != b"u":
                raise OSError(errno.ECHILD, "user namespace holder failed to unshare")
            _write_map(self.pid, "uid_map", rng)
            _write_map(self.pid, "gid_map", rng)
            fds: list[int] = []
            try:
                for ns in ("user", "net", "uts", "ipc"):
                    fds.append(os.open(f"/proc/{self.pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return UsernsFds(*fds)
        finally:
            self.discard()

    def discard(self) -> None:
        """Let the holder exit (its namespaces go with it unless opened)."""
        for fd in (self._ready, self._release):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ready = self._release = -1


def fork_holder(report: socket.socket | None = None) -> Holder:
    """Fork a ``Holder``. Forks: call only from a single-threaded process.

    The holder dies with its parent (PDEATHSIG, and EOF on the release pipe) and keeps
    none of the parent's descriptors. With ``report`` (the spawner's socket to the
    daemon) the holder first sends ``sync.Holder`` with a pidfd of itself, before its
    parent can know its pid: should the parent die, the holder is re-parented to the
    daemon (a child subreaper), which then has the pidfd to reap it with."""
    import prctl

    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        for fd in (ready_r, ready_w, hold_r, hold_w):
            os.close(fd)
        raise
    if pid == 0:  # the holder: no Python of it survives, it only _exits
        code = 1
        try:
            os.close(ready_r)
            os.close(hold_w)
            if report is not None:
                me = os.pidfd_open(os.getpid())
                sync.send(report, sync.Holder(pid=os.getpid()), [me])
                os.close(me)
            prctl.set_pdeathsig(signal.SIGKILL)
            prctl.set_name(HOLDER_NAME)
            if os.getppid() == parent:
                low, high = sorted((ready_w, hold_r))
                os.closerange(3, low)
                os.closerange(low + 1, high)
                os.closerange(high + 1, MAX_FD)
                n.unshare(n.CLONE_NEWUSER | OWNED_NS)
                os.write(ready_w, b"u")
                os.read(hold_r, 1)  # EOF once the parent holds the namespace fds
                code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(hold_r)
    return Holder(pid, ready_r, hold_w)


def make_namespaces(rng: UsernsSpec) -> UsernsFds:
    """A user namespace mapping 0..size-1 to ``rng``, with net/uts/ipc namespaces it
    owns, through a holder waited for here. Forks: single-threaded callers only."""
    holder = fork_holder()
    try:
        return holder.namespaces(rng)
    finally:
        os.waitpid(holder.pid, 0)


def join(userns_fd: int) -> None:
    """Enter the user namespace ``userns_fd`` as its root (uid/gid 0, no groups).

    After ``setns`` the kernel ids are still host root's, unmapped inside; switching to
    0 inside makes them the range's base, with the full capability set of that user
    namespace until the caller drops it."""
    n.setns(userns_fd, n.CLONE_NEWUSER)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def idmap_layers(paths: list[str], userns_fd: int) -> dict[str, int]:
    """Read-only idmapped copies of the mounts at ``paths`` (O_PATH-like fds), through
    which on-disk id N reads as N inside ``userns_fd``: one shared copy of each image
    layer serves every container's range.

    Each copy is idmapped while detached, then mounted over its own path: overlayfs
    before Linux 6.15 refuses a detached mount as a layer (EINVAL: it must be in the
    caller's mount namespace), which made every 5.19-6.14 kernel fall back. Call it in
    a private mount namespace of one's own (the container child's, the probe's)."""
    fds: dict[str, int] = {}
    try:
        for path in paths:
            if path in fds:
                continue
            fd = n.open_tree_clone(path)
            fds[path] = fd
            n.mount_setattr_idmap(
                fd, userns_fd, n.MOUNT_ATTR_RDONLY | n.MOUNT_ATTR_NODEV | n.MOUNT_ATTR_NOSUID, path
            )
            # MS_MOVE of an anonymous namespace's root attaches it (as move_mount does).
            n.mount(f"/proc/self/fd/{fd}", path, None, n.MS_MOVE)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def host_id(rng: UsernsSpec | None, inner: int) -> int:
    """The host id of in-container id ``inner`` (itself without a user namespace)."""
    if rng is None:
        return inner
    if not 0 <= inner < rng.size:
        raise InvalidRequest(
            f"id {inner} (the image's user) is outside the container's {rng.size} ids "
            "(userns.size)"
        )
    return rng.base + inner


def inner_id(rng: UsernsSpec, host: int, base: int) -> int:
    """The in-container id a host id stands for, whichever aligned range above ``base``
    it lies in; ids below ``base`` (written by the daemon, or without user namespaces)
    stand for themselves."""
    if host >= base:
        return (host - base) % rng.size
    return host if host < rng.size else rng.size - 2  # an id it cannot map: nobody


def shift_tree(root: Path, rng: UsernsSpec, base: int) -> int:
    """Give every file under ``root`` (not following symlinks, not crossing mounts) the
    owner and group of its in-container id in ``rng``; returns how many changed.

    Run on the host (daemon worker thread), as root, on the container's own files only
    while it is not running."""
    changed = 0
    dev = os.lstat(root).st_dev

    def fix(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        uid = rng.base + inner_id(rng, st.st_uid, base)
        gid = rng.base + inner_id(rng, st.st_gid, base)
        if (uid, gid) != (st.st_uid, st.st_gid):
            mode = st.st_mode
            os.lchown(path, uid, gid)
            # chown clears setuid/setgid bits: keep what the file had.
            if mode & 0o6000 and not os.path.islink(path):
                os.chmod(path, mode & 0o7777)
            changed += 1

    fix(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in dirnames:
            p = os.path.join(dirpath, d)
            fix(p)
            if os.lstat(p).st_dev == dev and not os.path.islink(p):
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            fix(os.path.join(dirpath, f))
    return changed


def probe(where: Path) -> str | None:
    """Why this kernel cannot run containers in user namespaces with idmapped overlay
    layers on the file system of ``where``, or None when it can. Forks and mounts in a
    private mount namespace: run it in a single-threaded process (``python -m``)."""
    try:
        n.unshare(n.CLONE_NEWNS)
        n.mount(None, "/", None, n.MS_REC | n.MS_PRIVATE)
    except OSError as exc:
        return f"private mount namespace: {exc}"
    with tempfile.TemporaryDirectory(dir=where, prefix=".userns-probe-") as tmp:
        t = Path(tmp)
        for d in ("lower", "upper", "work", "merged"):
            (t / d).mkdir()
        (t / "lower" / "f").write_bytes(b"")
        step = "unshare(CLONE_NEWUSER)"
        try:
            fds = make_namespaces(UsernsSpec(base=0x7FFF0000, size=1))
        except OSError as exc:
            return f"{step}: {exc}"
        try:
            step = "open_tree(OPEN_TREE_CLONE)"
            layers = idmap_layers([str(t / "lower")], fds.user)
            lfd = layers[str(t / "lower")]
            step = "mount overlay on an idmapped lower layer"
            try:
                n.mount(
                    "overlay",
                    str(t / "merged"),
                    "overlay",
                    0,
                    f"lowerdir=/proc/self/fd/{lfd},upperdir={t / 'upper'},workdir={t / 'work'}",
                )
            finally:
                os.close(lfd)
            st = os.stat(t / "merged" / "f")
            n.umount2(str(t / "merged"), n.MNT_DETACH)
            if st.st_uid != 0x7FFF0000:
                return f"{step}: the layer's root-owned file reads as uid {st.st_uid}"
        except OSError as exc:
            what = step
            if "mount_setattr" in str(exc):
                what = "mount_setattr(MOUNT_ATTR_IDMAP)"
            elif str(exc.strerror).startswith("mount:"):
                what = "attach the idmapped layer (MS_MOVE)"
            return f"{what}: errno {exc.errno} ({os.strerror(exc.errno or 0)})"
        finally:
            fds.close()
            # The idmapped copy over the lower dir, if it got that far: the temporary
            # dir cannot be removed under it.
            with contextlib.suppress(OSError):
                n.umount2(str(t / "lower"), n.MNT_DETACH)
    return None


def main(argv: list[str]) -> int:
    """``python -m rexecd.runtime.userns DIR``: print "ok", or why not, and exit 0/1."""
    import prctl

    prctl.set_pdeathsig(9)
    reason = probe(Path(argv[1]))
    sys.stdout.write("ok\n" if reason is None else reason + "\n")
    sys.stdout.flush()
    return 0 if reason is None else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
