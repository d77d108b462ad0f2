"""What a spawner child does between fork and execve, for a new container or an exec.

Runs only in a process the single-threaded spawner has just forked, already in its
final pid namespace. It marks itself non-dumpable first, takes a session keyring of
its own, joins the container's cgroup, unshares (new container) or joins (exec) the
other namespaces, builds the root or opens a PTY, drops privileges, installs the
seccomp filter and execs. Both paths exec the sealed rexec-init memfd, never a
container file directly: a program the kernel resolves while /proc/self/exe is this
interpreter could be the host's Python binary (the runc CVE-2019-5736 class). Of the
spawner's descriptors it keeps none: stdio is what the caller passed, a PTY, or the
container's own /dev/null. Any failure is sent to the caller as
``ChildError(step, errno, message)``; nothing here ever returns.

The namespace and mount steps (``join_namespaces``, ``build_root``) make their system
calls through a ``Kernel`` (``kernel.HOST`` here), which unit tests replace with a
recording fake.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import termios
import time
from errno import ENODEV
from typing import NoReturn

import prctl

from rexecd import _native as n
from rexecd.runtime import capabilities, rootfs, sync, userns
from rexecd.runtime.kernel import HOST, Kernel
from rexecd.runtime.spec import ContainerSpec, ExecSpec, ProcessSpec

NEW_CONTAINER_NS = (
    n.CLONE_NEWNS
    | n.CLONE_NEWUTS
    | n.CLONE_NEWIPC
    | n.CLONE_NEWNET
    | n.CLONE_NEWCGROUP
    | n.CLONE_NEWPID
)
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_AT_FDCWD = -100
# argv[0] that makes rexec-init exec argv[1] at once with argv[2:] (see init.c).
EXEC_MODE = "rexec-exec"


class _Trace:
    """Where a start trace goes: an fd of the spawner's (close-on-exec, like every other),
    -1 when tracing is off (see ``spawner.TRACE_ENV``); ``tag`` names the request and
    ``marks`` are the spawner's own steps, set just before the fork."""

    fd = -1
    tag = ""
    marks: list[tuple[str, int]] = []


def trace(fd: int, tag: str, marks: list[tuple[str, int]]) -> None:
    """Turn the start trace on for the next child: it writes ``tag``, ``marks`` and its
    own steps' times to ``fd`` before its execve."""
    _Trace.fd, _Trace.tag, _Trace.marks = fd, tag, marks


class _Step:
    """The name of the set-up step under way, reported with any failure; with tracing
    on, each step's start time too (``marks``, monotonic ns)."""

    def __init__(self) -> None:
        self.marks = list(_Trace.marks) if _Trace.fd >= 0 else None
        self._name = "start"
        if self.marks is not None:
            self.marks.append(("child", time.monotonic_ns()))

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        if self.marks is not None:
            self.marks.append((value, time.monotonic_ns()))

    def write_trace(self) -> None:
        """One line of the steps so far to the trace fd (tracing on only): the last
        thing before execve, so nothing of the container runs in between. A profile
        that refuses write(2) loses the line, not the start."""
        if self.marks is not None:
            self.marks.append(("execve", time.monotonic_ns()))
            line = " ".join(f"{name.replace(' ', '_')}={ns}" for name, ns in self.marks)
            with contextlib.suppress(OSError):
                os.write(_Trace.fd, f"{_Trace.tag} {line}\n".encode())


def _fail(sock: socket.socket, step: str, exc: BaseException) -> NoReturn:
    errno = exc.errno if isinstance(exc, OSError) else None
    msg = str(exc)
    try:
        sync.send(sock, sync.ChildError(step=step, errno=errno, message=msg))
    finally:
        os._exit(126)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _take_stdio(stdio: list[int]) -> None:
    for target, fd in enumerate(stdio[:3]):
        if fd != target:
            os.dup2(fd, target)
    for fd in stdio:
        if fd > 2:
            os.close(fd)


def _null_stdio(first: int) -> None:
    """Point stdio slots ``first``..2 at the container's own /dev/null.

    Called once inside the container's mount namespace: until then those slots are the
    spawner's, which are the daemon's log. An exec resolves a path the tenant controls,
    so anything but the null device there (a FIFO, a symlink, another node) is refused.
    """
    if first >= 3:
        return
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open("/dev/null", flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
            raise OSError(ENODEV, "/dev/null: not the null device")
        os.set_blocking(fd, True)
        for target in range(first, 3):
            os.dup2(fd, target)
    finally:
        os.close(fd)


def _join_cgroup(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def enter(
    body: ContainerSpec | ExecSpec,
    stdio: list[int],
    step: _Step,
    pidfd: int = -1,
    nsfds: userns.UsernsFds | None = None,
    k: Kernel = HOST,
) -> None:
    """First steps of every child: the spawner has already placed it in the right pid
    namespace (pid 1 of a fresh one for a container, the container's for an exec).

    With a user namespace (``nsfds`` from the spawner for a new container), the child
    joins the net/uts/ipc namespaces that user namespace owns, but unshares the mount
    and cgroup namespaces as host root: they stay owned by the initial user namespace,
    so nothing inside can ever mount or unmount there. An exec joins the container's
    user namespace last of all, here, as the kernel ids it then takes (the range's
    root) are the ones its PTY and files must have."""
    step.name = "signals"
    _reset_signals()
    step.name = "prctl dumpable"
    prctl.set_dumpable(False)
    # Keyrings are not namespaced: the inherited session keyring is the daemon's (and
    # the host login's), shared by every container. runc does the same.
    step.name = "session keyring"
    n.join_session_keyring()
    step.name = "stdio"
    _take_stdio(stdio)
    step.name = "cgroup join"
    _join_cgroup(body.cgroup_procs)
    join_namespaces(k, body, step, pidfd, nsfds)


def join_namespaces(
    k: Kernel,
    body: ContainerSpec | ExecSpec,
    step: _Step,
    pidfd: int = -1,
    nsfds: userns.UsernsFds | None = None,
) -> None:
    """Unshare a new container's namespaces (joining the user-owned ones first), or
    join a running container's through ``pidfd`` (which this closes)."""
    if isinstance(body, ContainerSpec):
        flags = NEW_CONTAINER_NS & ~n.CLONE_NEWPID
        if nsfds is not None:
            step.name = "join user-owned namespaces"
            for fd, kind in (
                (nsfds.net, n.CLONE_NEWNET),
                (nsfds.uts, n.CLONE_NEWUTS),
                (nsfds.ipc, n.CLONE_NEWIPC),
            ):
                k.setns(fd, kind)
            flags &= ~userns.OWNED_NS
        step.name = "unshare namespaces"
        k.unshare(flags)
    else:
        # ``pidfd`` was opened by the spawner, which already joined the pid namespace.
        step.name = "join container namespaces"
        try:
            k.setns(pidfd, NEW_CONTAINER_NS & ~n.CLONE_NEWPID)
            if body.join_userns:
                step.name = "join user namespace"
                userns.join(pidfd)
        finally:
            k.close(pidfd)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _finish_process(proc: ProcessSpec, step: _Step, keep_caps: list[str], last: int) -> None:
    """Drop privileges and close descriptors: the last steps before execve."""
    step.name = "capabilities"
    capabilities.drop_bounding(keep_caps, last)
    step.name = "set user"
    if proc.uid != 0 or proc.gid != 0 or proc.additional_gids:
        os.setgroups(proc.additional_gids)
        os.setresgid(proc.gid, proc.gid, proc.gid)
        os.setresuid(proc.uid, proc.uid, proc.uid)
    step.name = "capabilities"
    capabilities.clear_inheritable()
    if proc.no_new_privs:
        step.name = "no_new_privs"
        prctl.set_no_new_privs(True)
    step.name = "chdir"
    _chdir(proc.cwd)
    step.name = "close fds"
    # Everything above stdio becomes close-on-exec; the sync socket closing is how
    # the caller learns that execve succeeded.
    n.close_range(3, 0xFFFFFFFF, n.CLOSE_RANGE_CLOEXEC)
    os.umask(0o022)
    _install_seccomp(proc, step)


def _chdir(cwd: str) -> None:
    """chdir without magic links: a cwd of /proc/self/fd/N must never reach a host
    directory some fd of ours still refers to (runc CVE-2024-21626)."""
    fd = n.openat2(_AT_FDCWD, cwd, os.O_PATH | os.O_DIRECTORY, resolve=n.RESOLVE_NO_MAGICLINKS)
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)


def _install_seccomp(proc: ProcessSpec, step: _Step) -> None:
    """The process's seccomp filter: the last step before execve, after no_new_privs,
    so every set-up step above (mounts, capset, setuid) ran unfiltered."""
    step.name = "seccomp"
    if proc.seccomp is None:
        raise ValueError("the process spec chose no seccomp profile")
    programs = [binascii.a2b_base64(p) for p in proc.seccomp]
    for program in programs:
        n.seccomp_install(program)


def _find_program(name: str, env: dict[str, str]) -> str:
    """Where execvpe would find ``name`` (the PATH of ``env``), looked up in the
    container: a missing or non-executable program fails here, as ChildError "exec"."""
    dirs = [""] if "/" in name else os.get_exec_path(env)
    refused: OSError | None = None
    for d in dirs:
        path = os.path.join(d, name) if d else name
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path
        refused = PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    raise refused or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def container_init(
    spec: ContainerSpec,
    sock: socket.socket,
    stdio: list[int],
    init_fd: int,
    nsfds: userns.UsernsFds | None = None,
    k: Kernel = HOST,
) -> NoReturn:
    """A new container's pid 1, from fork until it execs rexec-init."""
    step = _Step()
    try:
        enter(spec, stdio, step, nsfds=nsfds, k=k)
        os.umask(0)
        step.name = "setsid"
        os.setsid()
        step.name = "loopback up"
        _loopback_up()
        step.name = "sethostname"
        k.sethostname(spec.hostname)
        last = capabilities.last_cap()
        sync.send(sock, sync.Ready())
        build_root(k, spec, step, nsfds)
        step.name = "stdio"
        _null_stdio(len(stdio))
        if spec.wait_for_go:
            step.name = "wait for go"
            msg, fds = sync.recv(sock)
            for fd in fds:
                os.close(fd)
            if not isinstance(msg, sync.Go):
                os._exit(125)  # the caller gave up: nothing to report to
        if nsfds is not None:
            step.name = "join user namespace"
            userns.join(nsfds.user)
            nsfds.close()
        _finish_process(spec.process, step, spec.process.capabilities, last)
        step.name = "exec init"
        step.write_trace()
        os.execve(init_fd, ["rexec-init", *spec.process.args], _env_dict(spec.process.env))
    except BaseException as exc:
        _fail(sock, step.name, exc)


def build_root(
    k: Kernel, spec: ContainerSpec, step: _Step, nsfds: userns.UsernsFds | None = None
) -> None:
    """Every mount of a new container, in order, ending with ``spec``'s root pivoted in."""
    step.name = "mount rootfs"
    rootfd = rootfs.mount_root(k, spec, nsfds.user if nsfds is not None else -1)
    step.name = "mount /dev"
    rootfs.mount_dev(k, rootfd, spec.userns.base if spec.userns is not None else 0)
    step.name = "mount /proc and /sys"
    rootfs.mount_proc_sys(k, rootfd)
    step.name = "mask paths"
    rootfs.mask_paths(k, rootfd, spec.masked_paths, spec.readonly_paths)
    step.name = "bind mounts"
    rootfs.bind_mounts(k, rootfd, spec.mounts)
    k.close(rootfd)
    step.name = "pivot_root"
    rootfs.pivot(k, spec.rootfs.target)


def _env_dict(env: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key:
            out[key] = value
    return out


def _open_pty(sock: socket.socket, cols: int = 80, rows: int = 24) -> None:
    """Allocate a PTY from the container's devpts (we are in its mount namespace), hand
    the master to the caller, and make the slave our controlling terminal and stdio.

    /dev/ptmx is the tenant's to replace (a FIFO, a file, a symlink elsewhere): the
    master is opened as /dev/pts/ptmx, the multiplexer of the container's own devpts
    instance, through no symlink and without blocking, and must be that: a 5:2
    character device on devpts. The slave comes from the master (TIOCGPTPEER), never
    by a name in the container's tree.
    """
    devpts_magic, tiocsptlck, tiocgptpeer, tiocgptn = 0x1CD1, 0x40045431, 0x5441, 0x80045430
    flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
    resolve = n.RESOLVE_NO_SYMLINKS | n.RESOLVE_NO_MAGICLINKS
    master = n.openat2(_AT_FDCWD, "/dev/pts/ptmx", flags | os.O_NONBLOCK, resolve=resolve)
    st = os.fstat(master)
    if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(5, 2)) or (
        n.fstatfs_type(master, "/dev/pts/ptmx") != devpts_magic
    ):
        raise OSError(ENODEV, "/dev/pts/ptmx is not the container's devpts multiplexer")
    os.set_blocking(master, True)
    fcntl.ioctl(master, tiocsptlck, struct.pack("i", 0))  # unlockpt
    slave = fcntl.ioctl(master, tiocgptpeer, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    number = struct.unpack("I", fcntl.ioctl(master, tiocgptn, b"\0" * 4))[0]
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    sync.send(sock, sync.PtyMaster(pts=f"/dev/pts/{number}"), [master])
    os.close(master)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def exec_in_container(
    spec: ExecSpec, sock: socket.socket, stdio: list[int], pidfd: int, init_fd: int
) -> NoReturn:
    """A process inside a running container's namespaces, from fork until it execs."""
    step = _Step()
    try:
        enter(spec, stdio, step, pidfd)
        os.umask(0o022)
        step.name = "setsid"
        os.setsid()
        last = capabilities.last_cap()
        if spec.process.tty:
            step.name = "open pty"
            _open_pty(sock)
        else:
            step.name = "stdio"
            _null_stdio(len(stdio))
        _finish_process(spec.process, step, spec.process.capabilities, last)
        step.name = "exec"
        env = _env_dict(spec.process.env)
        path = _find_program(spec.process.args[0], env)
        step.write_trace()
        os.execve(init_fd, [EXEC_MODE, path, *spec.process.args], env)
    except BaseException as exc:
        _fail(sock, step.name, exc)
