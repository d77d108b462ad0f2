"""Narrow kernel interface: the syscalls Python 3.11 lacks, each raising ``OSError`` with
errno and the path involved.

Every wrapper requires a Linux kernel with the call (unshare/setns: 3.8; openat2: 5.6;
close_range: 5.9; quotactl_fd: 5.14; keyctl: 2.6.10; seccomp filters: 3.17) and the
privilege the kernel asks for (CAP_SYS_ADMIN for mount, pivot_root, unshare and setns
of most namespace types and for setting quota limits; CAP_MKNOD for device nodes;
no_new_privs or CAP_SYS_ADMIN to install a seccomp filter). ``ScmpFilter`` compiles
seccomp rules with libseccomp, in user space only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

from rexecd._native._lowlevel import ffi, lib

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# openat2(2) resolve flags (linux/openat2.h).
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# close_range(2) and memfd_create(2) flags.
CLOSE_RANGE_CLOEXEC = 1 << 2
MFD_CLOEXEC = 1
MFD_ALLOW_SEALING = 2


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ffi.errno
        msg = f"{what}: {os.strerror(err)}"
        raise OSError(err, msg, path) if path is not None else OSError(err, msg)
    return ret


def _b(s: str | bytes | None) -> object:
    """A C string argument: bytes as given, str encoded, None as NULL."""
    if s is None:
        null: object = ffi.NULL
        return null
    return s if isinstance(s, bytes) else s.encode()


def unshare(flags: int) -> None:
    """unshare(2): detach the calling thread from the namespaces in ``flags``."""
    _check(lib.rx_unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace referred to by ``fd`` (a /proc/PID/ns/* file or pidfd)."""
    _check(lib.rx_setns(fd, nstype), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """mount(2). Raises OSError naming ``target``."""
    _check(lib.rx_mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2). Raises OSError naming ``target``."""
    _check(lib.rx_umount2(_b(target), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2); ``pivot_root(".", ".")`` stacks the old root under the new one."""
    _check(lib.rx_pivot_root(_b(new_root), _b(put_old)), "pivot_root", new_root)


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` under the ``RESOLVE_*`` constraints.

    ``O_CLOEXEC`` is always added. Raises OSError naming ``path`` (EXDEV when the path
    would leave ``dirfd``, ELOOP when it crosses a forbidden symlink).
    """
    p = path if isinstance(path, bytes) else path.encode()
    return _check(
        lib.rx_openat2(dirfd, p, flags | os.O_CLOEXEC, mode, resolve),
        "openat2",
        os.fsdecode(p),
    )


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    """close_range(2); with ``CLOSE_RANGE_CLOEXEC`` marks the fds close-on-exec instead."""
    _check(lib.rx_close_range(first, last, flags), "close_range")


def memfd_create(name: str, flags: int = MFD_CLOEXEC | MFD_ALLOW_SEALING) -> int:
    """memfd_create(2): an anonymous file, sealable by default."""
    return _check(lib.rx_memfd_create(_b(name), flags), "memfd_create", name)


def mknodat(dirfd: int, path: str, mode: int, major: int, minor: int) -> None:
    """mknodat(2) with an explicit major/minor pair (needs CAP_MKNOD)."""
    _check(lib.rx_mknodat(dirfd, _b(path), mode, major, minor), "mknod", path)


def sethostname(name: str) -> None:
    """sethostname(2) in the caller's UTS namespace."""
    raw = name.encode()
    _check(lib.rx_sethostname(raw, len(raw)), "sethostname", name)


def syncfs(path: str) -> None:
    """syncfs(2): flush the one file system that holds ``path`` (not every mounted one)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(lib.rx_syncfs(fd), "syncfs", path)
    finally:
        os.close(fd)


def quotactl_fd(fd: int, cmd: int, qid: int, addr: bytearray | None, path: str) -> None:
    """quotactl_fd(2) (Linux >= 5.14): quota command ``cmd`` (``QCMD(op, type)``) for id
    ``qid`` on the file system that holds the open file ``fd``.

    ``addr`` is the command's structure, read and/or written in place by the kernel
    (None for commands without one); it must be at least as large as the kernel's.
    Setting limits needs CAP_SYS_ADMIN. Raises OSError naming ``path`` (ENOSYS on an
    older kernel, ESRCH when that quota type is not on, EINVAL when the file system
    has no such quota type).
    """
    buf = ffi.from_buffer(addr) if addr is not None else ffi.NULL
    _check(lib.rx_quotactl_fd(fd, cmd, qid, buf), "quotactl", path)


def join_session_keyring(name: str | None = None) -> int:
    """keyctl(KEYCTL_JOIN_SESSION_KEYRING): give the caller a session keyring of its own
    (a fresh anonymous one for ``None``) and return its serial.

    Keyrings are not namespaced: a process keeps the session keyring it inherited, and
    with it possession of every key its ancestors put there, until it joins another.
    """
    return int(_check(lib.rx_join_session_keyring(_b(name)), "keyctl join session keyring"))


def capbset_drop_except(keep: int, last: int) -> None:
    """prctl(PR_CAPBSET_DROP) of every capability 0..``last`` whose bit is not set in
    ``keep``; needs CAP_SETPCAP."""
    _check(lib.rx_capbset_drop_except(keep, last), "capbset drop")


def clear_inheritable() -> None:
    """capset(2) with the inheritable set emptied, permitted and effective as they are."""
    _check(lib.rx_clear_inheritable(), "capset inheritable")


def fstatfs_type(fd: int, path: str) -> int:
    """fstatfs(2)'s ``f_type`` (a ``*_MAGIC`` of linux/magic.h): which kind of file system
    holds the open file ``fd`` (an ``O_PATH`` fd will do). Raises OSError naming ``path``."""
    out = ffi.new("long long *")
    _check(lib.rx_fstatfs_type(fd, out), "fstatfs", path)
    return int(out[0]) & 0xFFFFFFFF


# libseccomp actions (seccomp.h); an errno action carries its errno in the low 16 bits.
SCMP_ACT_ALLOW: int = lib.SCMP_ACT_ALLOW
SCMP_ACT_KILL_PROCESS: int = lib.SCMP_ACT_KILL_PROCESS
SCMP_ACT_KILL_THREAD: int = lib.SCMP_ACT_KILL_THREAD
SCMP_ACT_TRAP: int = lib.SCMP_ACT_TRAP
SCMP_ACT_LOG: int = lib.SCMP_ACT_LOG
# Argument comparisons; MASKED_EQ compares ``arg & datum_a == datum_b``.
SCMP_CMP_NE: int = lib.SCMP_CMP_NE
SCMP_CMP_LT: int = lib.SCMP_CMP_LT
SCMP_CMP_LE: int = lib.SCMP_CMP_LE
SCMP_CMP_EQ: int = lib.SCMP_CMP_EQ
SCMP_CMP_GE: int = lib.SCMP_CMP_GE
SCMP_CMP_GT: int = lib.SCMP_CMP_GT
SCMP_CMP_MASKED_EQ: int = lib.SCMP_CMP_MASKED_EQ


def scmp_act_errno(err: int) -> int:
    """The libseccomp action "fail with ``err``" (SCMP_ACT_ERRNO)."""
    return 0x00050000 | (err & 0xFFFF)


def scmp_resolve(name: str) -> int | None:
    """The native syscall number of ``name``; None when libseccomp does not know the name.

    A syscall of another architecture only (``chown32`` on x86_64) is a negative pseudo
    number, which libseccomp accepts in rules and leaves out of the program."""
    nr: int = lib.rx_scmp_resolve(name.encode())
    return None if nr == -1 else nr


class ScmpFilter:
    """One libseccomp filter context for the native architecture, compiled in user space.

    ``default_action`` answers syscalls no rule matches; ``badarch_action`` answers
    syscalls made through another ABI (a 32-bit ``int 0x80``, x32)."""

    def __init__(self, default_action: int, badarch_action: int) -> None:
        ctx = lib.rx_scmp_new(default_action, badarch_action)
        if ctx == ffi.NULL:
            _check(-1, "seccomp_init")
        self._ctx: object = ctx

    def add_rule(
        self, action: int, nr: int, args: Sequence[tuple[int, int, int, int]] = ()
    ) -> None:
        """``action`` for syscall ``nr`` when every ``(index, op, datum_a, datum_b)`` holds."""
        _check(
            lib.rx_scmp_rule(
                self._ctx,
                action,
                nr,
                len(args),
                ffi.new("unsigned int[]", [a[0] for a in args] or [0]),
                ffi.new("int[]", [a[1] for a in args] or [0]),
                ffi.new("uint64_t[]", [a[2] for a in args] or [0]),
                ffi.new("uint64_t[]", [a[3] for a in args] or [0]),
            ),
            f"seccomp rule for syscall {nr}",
        )

    def _export(self, pfc: bool) -> bytes:
        fd = memfd_create("seccomp", MFD_CLOEXEC)
        try:
            _check(lib.rx_scmp_export(self._ctx, fd, int(pfc)), "seccomp export")
            size = os.fstat(fd).st_size
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def export_bpf(self) -> bytes:
        """The filter as a classic BPF program (8 bytes an instruction), for ``seccomp_install``."""
        return self._export(False)

    def export_pfc(self) -> str:
        """libseccomp's human-readable pseudo filter code of the same program."""
        return self._export(True).decode()

    def close(self) -> None:
        if self._ctx is not None:
            lib.rx_scmp_release(self._ctx)
            self._ctx = None

    def __enter__(self) -> ScmpFilter:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def seccomp_install(program: bytes) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER) of a BPF ``program`` on the calling thread.

    Filters stack: each one installed later is consulted too, and the strictest answer
    wins. Needs no_new_privs (or CAP_SYS_ADMIN)."""
    _check(lib.rx_seccomp_install(ffi.from_buffer(program), len(program)), "seccomp")


# inotify event masks (linux/inotify.h).
IN_MODIFY = 0x2


def inotify_watch(path: str, mask: int) -> int:
    """A non-blocking, close-on-exec inotify fd watching ``path`` for the events of
    ``mask`` (``IN_MODIFY``...): readable when one happened (inotify_init1: Linux 2.6.27).
    The caller closes it.
    Raises OSError naming ``path``."""
    fd = _check(lib.rx_inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK), "inotify_init1", path)
    try:
        _check(lib.rx_inotify_add_watch(fd, _b(path), mask), "inotify_add_watch", path)
    except OSError:
        os.close(fd)
        raise
    return fd


# open_tree(2) and mount_setattr(2) flags (linux/mount.h); Linux >= 5.2 and 5.12.
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
# ioctl on a namespace fd (linux/nsfs.h): an fd of the user namespace that owns it.
NS_GET_USERNS = 0xB701


def open_tree_clone(path: str, recursive: bool = False) -> int:
    """open_tree(OPEN_TREE_CLONE): a detached copy of the mount at ``path`` (close-on-exec),
    which ``mount_setattr_idmap`` can change before anything uses it. Needs CAP_SYS_ADMIN."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(lib.rx_open_tree(-100, _b(path), flags), "open_tree", path)


def mount_setattr_idmap(fd: int, userns_fd: int, attr_set: int = 0, path: str = "") -> None:
    """mount_setattr(2) of the detached mount ``fd``: idmap it through the user namespace
    ``userns_fd`` (ids on disk are read as ids inside that namespace), plus ``attr_set``.
    Raises OSError naming ``path`` (EINVAL when the file system cannot be idmapped)."""
    _check(lib.rx_mount_setattr_idmap(fd, userns_fd, attr_set), "mount_setattr idmap", path)
