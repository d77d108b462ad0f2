"""The container's root file system, built inside the child's private mount namespace.

Requires CAP_SYS_ADMIN and CAP_MKNOD, a private mount namespace (the caller has
unshared CLONE_NEWNS), a new pid namespace for /proc, and a new network namespace
for /sys. Every mount target is resolved inside the new root with openat2
(RESOLVE_IN_ROOT) and mounted through /proc/self/fd, so a symlink in the image can
never redirect a mount onto the host.

Every system call goes through the ``Kernel`` each function is handed (``kernel.HOST``
in the spawner's child), so unit tests can record the mount sequence without root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from rexecd import _native as n
from rexecd.runtime.kernel import Kernel
from rexecd.runtime.spec import BindMount, ContainerSpec

_IN_ROOT = n.RESOLVE_IN_ROOT | n.RESOLVE_NO_MAGICLINKS
_NOSUID_NODEV_NOEXEC = n.MS_NOSUID | n.MS_NODEV | n.MS_NOEXEC

# (name, major, minor): the only device nodes a container gets.
DEVICES: tuple[tuple[str, int, int], ...] = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_DEV_LINKS = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)


def _fdpath(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@contextmanager
def _opened(k: Kernel, fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        k.close(fd)


def open_dir_in_root(
    k: Kernel, rootfd: int, rel: str, *, create: bool, strict: bool = False
) -> int:
    """An O_PATH fd of directory ``rel`` resolved inside ``rootfd``, created if missing.

    ``strict`` refuses symlinks anywhere on the path (used for /proc, /sys and /dev,
    whose masking must not be redirected by the image).
    """
    resolve = _IN_ROOT | (n.RESOLVE_NO_SYMLINKS if strict else 0)
    rel = rel.strip("/") or "."
    try:
        return k.openat2(rootfd, rel, os.O_PATH | os.O_DIRECTORY, resolve=resolve)
    except FileNotFoundError:
        if not create or rel == ".":
            raise
    parent, _, name = rel.rpartition("/")
    with _opened(k, open_dir_in_root(k, rootfd, parent, create=True, strict=strict)) as pfd:
        try:
            k.mkdirat(pfd, name, 0o755)
        except FileExistsError:
            pass
        return k.openat2(
            pfd, name, os.O_PATH | os.O_DIRECTORY, resolve=n.RESOLVE_BENEATH | n.RESOLVE_NO_SYMLINKS
        )


def _overlay_options(spec: ContainerSpec, fds: dict[str, int]) -> str:
    """Overlay options naming each layer by ``/proc/self/fd/N`` of an fd in ``fds``.

    The kernel shows the option strings as given in the container's own mountinfo, so
    host paths here would tell a tenant where the state and run dirs are, their user
    id and container name; fd paths tell it nothing (and keep the options short).
    """
    r = spec.rootfs
    # overlayfs lists the uppermost lower layer first.
    lower = ":".join(_fdpath(fds[p]) for p in reversed(r.lowerdirs))
    opts = f"lowerdir={lower},upperdir={_fdpath(fds[r.upperdir])},workdir={_fdpath(fds[r.workdir])}"
    if len(opts) >= 4000:
        raise OSError(7, "overlay options exceed one page (too many layers)", r.target)
    return opts


def mount_root(k: Kernel, spec: ContainerSpec, userns_fd: int = -1) -> int:
    """Make every mount private, mount the overlay root; returns an O_PATH fd of it.

    With ``userns_fd`` the image layers are idmapped through that user namespace (the
    upper and work dirs already belong to its range), so the one shared copy of each
    layer shows its root-owned files as owned by the container's root."""
    k.mount(None, "/", None, n.MS_REC | n.MS_PRIVATE)
    r = spec.rootfs
    fds: dict[str, int] = {}
    try:
        if userns_fd >= 0:
            fds.update(k.idmap_layers(r.lowerdirs, userns_fd))
        for path in (*r.lowerdirs, r.upperdir, r.workdir):
            if path not in fds:
                fds[path] = k.open(path, os.O_PATH | os.O_DIRECTORY)
        k.mount("overlay", r.target, "overlay", 0, _overlay_options(spec, fds))
    finally:
        for fd in fds.values():
            k.close(fd)
    return k.open(r.target, os.O_PATH | os.O_DIRECTORY)


# PTYs one container's devpts hands out. Every devpts instance but the host's draws on
# one host-wide pool (kernel.pty.max - kernel.pty.reserve: 3072 by default); without a
# max of its own, one container could take it all and leave every other tenant's
# terminals without a PTY.
DEVPTS_MAX = 128


def mount_dev(k: Kernel, rootfd: int, id_base: int = 0) -> None:
    """/dev as a small tmpfs with the safe device nodes, its own devpts, shm and mqueue.

    ``id_base`` is the host id of the container's root (0 without a user namespace):
    what /dev holds is owned by it, as it would be by root without one."""
    owner = f",uid={id_base},gid={id_base}" if id_base else ""
    with _opened(k, open_dir_in_root(k, rootfd, "dev", create=True, strict=True)) as dfd:
        k.mount(
            "tmpfs",
            _fdpath(dfd),
            "tmpfs",
            n.MS_NOSUID | n.MS_STRICTATIME,
            f"mode=755,size=65536k{owner}",
        )
    dev_flags = os.O_DIRECTORY | os.O_RDONLY
    with _opened(k, k.openat2(rootfd, "dev", dev_flags, resolve=_IN_ROOT)) as dev:
        for name, major, minor in DEVICES:
            k.mknodat(dev, name, stat.S_IFCHR | 0o666, major, minor)
            k.fchmodat(dev, name, 0o666)
        for name, target in _DEV_LINKS:
            k.symlinkat(target, dev, name)
        for sub in ("pts", "shm", "mqueue"):
            k.mkdirat(dev, sub, 0o755)
        if id_base:
            for name in [d[0] for d in DEVICES] + [link[0] for link in _DEV_LINKS]:
                k.fchownat(dev, name, id_base, id_base, follow=False)
            for sub in ("pts", "shm", "mqueue"):
                k.fchownat(dev, sub, id_base, id_base, follow=True)
        with _opened(k, k.openat2(dev, "pts", os.O_PATH, resolve=n.RESOLVE_BENEATH)) as fd:
            k.mount(
                "devpts",
                _fdpath(fd),
                "devpts",
                n.MS_NOSUID | n.MS_NOEXEC,
                f"newinstance,ptmxmode=0666,mode=0620,gid={id_base + 5},max={DEVPTS_MAX}",
            )
        with _opened(k, k.openat2(dev, "shm", os.O_PATH, resolve=n.RESOLVE_BENEATH)) as fd:
            k.mount(
                "shm", _fdpath(fd), "tmpfs", _NOSUID_NODEV_NOEXEC, f"mode=1777,size=65536k{owner}"
            )
        with _opened(k, k.openat2(dev, "mqueue", os.O_PATH, resolve=n.RESOLVE_BENEATH)) as fd:
            k.mount("mqueue", _fdpath(fd), "mqueue", _NOSUID_NODEV_NOEXEC)


def mount_proc_sys(k: Kernel, rootfd: int) -> None:
    """A /proc of the container's pid namespace and a read-only /sys of its net namespace."""
    with _opened(k, open_dir_in_root(k, rootfd, "proc", create=True, strict=True)) as fd:
        k.mount("proc", _fdpath(fd), "proc", _NOSUID_NODEV_NOEXEC)
    with _opened(k, open_dir_in_root(k, rootfd, "sys", create=True, strict=True)) as fd:
        k.mount("sysfs", _fdpath(fd), "sysfs", _NOSUID_NODEV_NOEXEC | n.MS_RDONLY)


def _open_existing(k: Kernel, rootfd: int, path: str) -> int | None:
    try:
        return k.openat2(rootfd, path.lstrip("/"), os.O_PATH | os.O_NOFOLLOW, resolve=_IN_ROOT)
    except FileNotFoundError:
        return None


def mask_paths(k: Kernel, rootfd: int, masked: list[str], readonly: list[str]) -> None:
    """Hide ``masked`` (files behind /dev/null, dirs behind an empty read-only tmpfs) and
    make ``readonly`` read-only; paths the kernel does not have are skipped."""
    with _opened(k, k.openat2(rootfd, "dev/null", os.O_PATH, resolve=_IN_ROOT)) as null:
        # Our own node on the /dev tmpfs mounted just before; were it anything else (an
        # image's symlink to a proc file), each mask would bind that file instead: a
        # writable alias of it (runc CVE-2025-31133).
        st = k.fstat(null)
        if not stat.S_ISCHR(st.mode) or st.rdev != os.makedev(1, 3):
            raise OSError(errno.EINVAL, "/dev/null is not the null device", "/dev/null")
        for path in masked:
            fd = _open_existing(k, rootfd, path)
            if fd is None:
                continue
            with _opened(k, fd):
                if stat.S_ISDIR(k.fstat(fd).mode):
                    k.mount("tmpfs", _fdpath(fd), "tmpfs", n.MS_RDONLY, "size=0")
                else:
                    k.mount(_fdpath(null), _fdpath(fd), None, n.MS_BIND)
    for path in readonly:
        fd = _open_existing(k, rootfd, path)
        if fd is None:
            continue
        with _opened(k, fd):
            k.mount(_fdpath(fd), _fdpath(fd), None, n.MS_BIND | n.MS_REC)
        # Re-resolve: the bind above stacked a new mount over the old dentry.
        fd2 = _open_existing(k, rootfd, path)
        if fd2 is None:
            continue
        with _opened(k, fd2):
            k.mount(
                None,
                _fdpath(fd2),
                None,
                n.MS_BIND | n.MS_REMOUNT | n.MS_RDONLY | _NOSUID_NODEV_NOEXEC,
            )


def bind_mounts(k: Kernel, rootfd: int, mounts: list[BindMount]) -> None:
    """Bind host directories (volumes) into the root at targets resolved inside it,
    and host files (lxcfs's) over files of the container's fresh /proc."""
    for m in mounts:
        with _opened(k, _bind_target(k, rootfd, m)) as fd:
            k.mount(m.source, _fdpath(fd), None, n.MS_BIND | n.MS_REC)
        if m.readonly:
            # Re-resolve: the fd above names the dentry under the new mount, and a
            # remount through it would change the mount beneath (the container's root).
            with _opened(k, _bind_target(k, rootfd, m)) as fd:
                k.mount(None, _fdpath(fd), None, n.MS_BIND | n.MS_REMOUNT | n.MS_RDONLY)


def _bind_target(k: Kernel, rootfd: int, m: BindMount) -> int:
    if m.target.startswith("/proc/"):
        # Over a file the kernel's proc made: it must exist, and no symlink counts.
        return k.openat2(
            rootfd, m.target.lstrip("/"), os.O_PATH, resolve=_IN_ROOT | n.RESOLVE_NO_SYMLINKS
        )
    return open_dir_in_root(k, rootfd, m.target, create=True)


def pivot(k: Kernel, target: str) -> None:
    """Make ``target`` the root and detach the old one, leaving no path to the host."""
    k.chdir(target)
    k.pivot_root(".", ".")
    k.umount2(".", n.MNT_DETACH)
    k.chdir("/")
