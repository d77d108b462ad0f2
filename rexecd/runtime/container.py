"""Container lifecycle on this host: directories, cgroup, spawn, the Ready/Go hand-shake,
signals, exec and removal. Sync code: the daemon calls it from worker threads.

The container's overlay root is mounted inside its own mount namespace, so it
disappears with the container and never needs unmounting; the host keeps only
the upper/work directories (the container's data) and the cgroup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from rexecd.errors import ChildSetupError, NotFound, RexecError, RuntimeFailure
from rexecd.runtime import procinfo, sync
from rexecd.runtime.capabilities import DEFAULT_CAPS
from rexecd.runtime.cgroups import Cgroup, CgroupDriver, CgroupLimits
from rexecd.runtime.seccomp import DEFAULT as DEFAULT_SECCOMP
from rexecd.runtime.seccomp import SeccompFilters
from rexecd.runtime.spawner import Child, Spawner
from rexecd.runtime.spec import (
    BindMount,
    ContainerSpec,
    ExecSpec,
    ProcessSpec,
    RootfsSpec,
    UsernsSpec,
)
from rexecd.runtime.userns import IdRanges
from rexecd.runtime.users import Identity, resolve_user

log = logging.getLogger(__name__)

# How long a reaped child's status may take to come back from the spawner: it sends it
# right after waitpid, so this only bounds a wait on a wedged spawner.
SPAWNER_REPORT_S = 10.0
# How long a SIGKILLed init may take to go (uninterruptible sleep) before a stop gives up.
KILL_WAIT_S = 10.0
# How long an exec's child may take from fork to its PTY master and to execve. Its
# set-up takes milliseconds; what it waits on inside the container (a frozen cgroup,
# say) must not hold a daemon thread for good.
EXEC_HANDSHAKE_S = 30.0
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Image users resolved, kept per Runtime (see Runtime.image_user); forgotten when full.
MAX_CACHED_USERS = 512


@dataclass(frozen=True)
class ContainerDirs:
    """Where one container lives on the host: data under the state dir, mount point under run."""

    base: Path
    upper: Path
    work: Path
    rootfs: Path


@dataclass(frozen=True)
class ImageView:
    """The parts of an image the runtime needs (kept free of the image store's models)."""

    layers: list[Path]
    env: list[str]
    entrypoint: list[str] | None
    cmd: list[str] | None
    working_dir: str
    user: str


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """``extra`` overrides ``base`` key by key; order of first appearance is kept."""
    out: dict[str, str] = {}
    for item in [*base, *extra]:
        key, _, value = item.partition("=")
        out[key] = value
    if "PATH" not in out:
        out["PATH"] = DEFAULT_PATH.partition("=")[2]
    return [f"{k}={v}" for k, v in out.items()]


class Runtime:
    """Creates, starts, enters and removes containers through one spawner."""

    def __init__(
        self,
        state_dir: Path,
        run_dir: Path,
        cgroups: CgroupDriver | None,
        spawner: Spawner,
        seccomp: SeccompFilters | None = None,
        userns: IdRanges | None = None,
    ) -> None:
        self.state_dir = state_dir
        # Host id ranges for containers' own user namespaces; None: containers run
        # in the daemon's (container root is host root).
        self.userns = userns
        self.run_dir = run_dir
        self.cgroups = cgroups
        # Seccomp profiles by name, each compiled once for every container and exec.
        self.seccomp = seccomp or SeccompFilters()
        self._spawner = spawner
        self._spawner_lock = threading.Lock()
        self._users: dict[tuple[str, tuple[Path, ...]], Identity] = {}
        self._users_lock = threading.Lock()
        for d in (state_dir / "containers", run_dir / "containers"):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    @property
    def spawner(self) -> Spawner:
        """The spawner, restarted if it died: containers it had started live on (they
        re-parent to the daemon, a subreaper, and are watched through pidfds)."""
        with self._spawner_lock:
            if not self._spawner.alive:
                log.error("spawner process %d died: starting a new one", self._spawner.pid)
                with contextlib.suppress(Exception):
                    self._spawner.close()
                self._spawner = Spawner()
            return self._spawner

    # ------------------------------------------------------------ layout

    def dirs(self, cid: str, ephemeral: bool = False) -> ContainerDirs:
        """``ephemeral`` keeps the upper dir on the run dir (tmpfs) for throw-away runs."""
        base = (self.run_dir if ephemeral else self.state_dir) / "containers" / cid
        return ContainerDirs(
            base=base,
            upper=base / "upper",
            work=base / "work",
            rootfs=self.run_dir / "containers" / cid / "rootfs",
        )

    def capabilities(self) -> list[str]:
        """Docker's default set, less CAP_MKNOD where no devices controller guards nodes."""
        caps = list(DEFAULT_CAPS)
        if self.cgroups is None or not self.cgroups.available().get("devices", False):
            caps.remove("mknod")
        return caps

    def build_spec(
        self,
        cid: str,
        hostname: str,
        image: ImageView,
        dirs: ContainerDirs,
        *,
        args: list[str] | None = None,
        env: list[str] | None = None,
        user: str | None = None,
        workdir: str | None = None,
        mounts: list[BindMount] | None = None,
        tty: bool = False,
        seccomp: str = DEFAULT_SECCOMP,
        userns: UsernsSpec | None = None,
    ) -> ContainerSpec:
        """A spec honouring the image config (Env, Entrypoint, Cmd, WorkingDir, User).

        ``args=None`` makes an idle container (init alone); a list (even empty) runs the
        image's entrypoint with those arguments, or with the image's Cmd when empty.
        ``seccomp`` names the profile (``default``, ``unconfined`` or a file's path);
        ``userns`` the host id range of the container's own user namespace, if any.
        """
        if args is None:
            argv: list[str] = []  # idle: the container is entered through exec/terminals
        else:
            argv = list(image.entrypoint or []) + (list(args) or list(image.cmd or []))
        ident = self.image_user(user if user is not None else image.user, image.layers)
        if userns is not None:
            ident.require_mapped(userns.size)
        proc_env = merge_env(
            image.env, [f"HOME={ident.home}", f"HOSTNAME={hostname}", *(env or [])]
        )
        return ContainerSpec(
            id=cid,
            hostname=hostname,
            rootfs=RootfsSpec(
                lowerdirs=[str(p) for p in image.layers],
                upperdir=str(dirs.upper),
                workdir=str(dirs.work),
                target=str(dirs.rootfs),
            ),
            process=ProcessSpec(
                args=argv,
                env=proc_env,
                cwd=workdir or image.working_dir or "/",
                uid=ident.uid,
                gid=ident.gid,
                additional_gids=list(ident.additional_gids),
                capabilities=self.capabilities(),
                tty=tty,
                seccomp=self.seccomp.programs(seccomp),
            ),
            mounts=list(mounts or []),
            userns=userns,
        )

    def image_user(self, user: str, layers: list[Path]) -> Identity:
        """``resolve_user`` of an image's own layers, read once per user and layer set:
        a layer directory is named by its content's digest and never changes, and
        reading /etc/passwd and /etc/group through the layers cost a start 0.3 ms. (A
        running container's root is the tenant's to change: an exec resolves it anew.)"""
        key = (user, tuple(layers))
        with self._users_lock:
            hit = self._users.get(key)
        if hit is not None:
            return hit
        ident = resolve_user(user, layers)
        with self._users_lock:
            if len(self._users) >= MAX_CACHED_USERS:
                self._users.clear()
            self._users[key] = ident
        return ident

    def create_dirs(self, dirs: ContainerDirs, userns: UsernsSpec | None = None) -> None:
        """The container's directories; with ``userns`` the upper and work dirs belong to
        its root (the base of the range), the overlay root's owner as seen inside."""
        dirs.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        dirs.upper.mkdir(mode=0o755, exist_ok=True)
        dirs.work.mkdir(mode=0o700, exist_ok=True)
        dirs.rootfs.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = userns.base if userns is not None else 0
        for d in (dirs.upper, dirs.work):
            st = os.lstat(d)
            if (st.st_uid, st.st_gid) != (owner, owner):
                os.lchown(d, owner, owner)

    # ------------------------------------------------------------ lifecycle

    def start(
        self,
        spec: ContainerSpec,
        limits: CgroupLimits | None,
        *,
        on_ready: Callable[[int], None] | None = None,
        stdio: list[int] | None = None,
    ) -> int:
        """Start the container's init and return its host pid once it has exec'd.

        ``on_ready(pid)`` runs while the child waits between Ready and Go (network set-up
        into ``/proc/PID/ns/net``). On any failure everything made here is undone and
        the error names the step that failed.
        """
        with contextlib.ExitStack() as undo:
            cg = self._cgroup(spec.id, limits, undo)
            if cg is not None:
                spec = replace(spec, cgroup_procs=cg.join_paths())
            # Nothing to do between Ready and exec: save the child the round trip.
            spec = replace(spec, wait_for_go=on_ready is not None)
            child = self.spawner.run(spec, stdio)
            undo.callback(child.close)
            undo.callback(self._kill_and_reap, child.pid)
            child.expect(sync.Ready)
            if on_ready is not None:
                try:
                    on_ready(child.pid)
                    sync.send(child.sock, sync.Go())
                except (OSError, RexecError) as exc:
                    child.raise_reported(exc)
            child.wait_exec()
            undo.pop_all()
            child.close()
            return child.pid
        raise AssertionError("unreachable")

    def _cgroup(
        self, cid: str, limits: CgroupLimits | None, undo: contextlib.ExitStack
    ) -> Cgroup | None:
        if self.cgroups is None:
            return None
        try:
            cg = self.cgroups.create(cid, limits or CgroupLimits())
        except OSError as exc:
            raise RuntimeFailure.from_oserror("cgroup create", exc) from exc
        undo.callback(cg.destroy)
        return cg

    def _kill_and_reap(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.spawner.wait(pid, timeout=10)

    def cgroup(self, cid: str) -> Cgroup | None:
        """The container's cgroup, if this host has a driver and it exists."""
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.open(cid)
        except NotFound:
            return None

    def exec(
        self,
        cid: str,
        pid: int,
        process: ProcessSpec,
        stdio: list[int] | None = None,
        *,
        seccomp: str = DEFAULT_SECCOMP,
    ) -> tuple[Child, int | None]:
        """Start ``process`` inside the running container whose init is ``pid``, under
        the seccomp profile ``seccomp`` (the container's own, as the caller knows it).

        Returns the child (its sync socket still open) and, for a tty process, the PTY
        master fd allocated in the container's devpts. The caller reads the exit status
        from ``spawner.wait(child.pid)``.
        """
        cg = self.cgroup(cid)
        spec = ExecSpec(
            container_pid=pid,
            process=replace(
                process,
                capabilities=process.capabilities or self.capabilities(),
                seccomp=self.seccomp.programs(seccomp),
            ),
            cgroup_procs=cg.join_paths() if cg is not None else [],
            join_userns=has_own_userns(pid),
        )
        child = self.spawner.exec(spec, stdio)
        master: int | None = None
        try:
            if process.tty:
                _msg, fds = child.expect(sync.PtyMaster, timeout=EXEC_HANDSHAKE_S)
                if not fds:
                    raise ChildSetupError("open pty", "no PTY master received")
                master = fds[0]
            child.wait_exec(timeout=EXEC_HANDSHAKE_S)
        except BaseException:
            if master is not None:
                os.close(master)
            self._kill_and_reap(child.pid)
            child.close()
            raise
        child.close()
        return child, master

    def stop(self, cid: str, pid: int, timeout: float = 10.0) -> int | None:
        """SIGTERM to init, then SIGKILL to every process of the container after
        ``timeout`` seconds; returns once init has exited, with its status if known
        (see ``exit_status``). Blocking: the daemon halts a container it watches on
        its event loop instead, with ``signal`` and ``kill``."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.kill_cgroup(cid)
            return self._spawner.poll(pid)
        try:
            self.signal(pidfd, signal.SIGTERM)
            exited = _wait_pidfd(pidfd, timeout)
            if not exited:
                self.kill(cid, pidfd)
                exited = _wait_pidfd(pidfd, KILL_WAIT_S)
            self.kill_cgroup(cid)
            return self.exit_status(pid, pidfd) if exited else None
        finally:
            os.close(pidfd)

    @staticmethod
    def signal(pidfd: int, sig: int) -> None:
        """Send ``sig`` to the process behind ``pidfd``; nothing if it has exited."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)

    def kill(self, cid: str, pidfd: int) -> None:
        """SIGKILL every process of the container, init (``pidfd``) last."""
        self.kill_cgroup(cid)
        self.signal(pidfd, signal.SIGKILL)

    def exit_status(self, pid: int, pidfd: int) -> int | None:
        """The exit status of ``pid``, which has exited (its ``pidfd`` polled readable),
        collected from whichever process is its parent; None when that is not ours.

        - the daemon, once the spawner that started it died (the daemon is a child
          subreaper): ``waitid`` on the pidfd reaps it here;
        - the live spawner: it reaps the process and reports the status at once;
        - anyone else (after a daemon restart, the old daemon's nearest subreaper or
          pid 1): that parent reaps it, and this daemon has no status to wait for.
        """
        status = _reap(pid, pidfd)
        if status is not None:
            return status
        sp = self._spawner
        if sp.is_parent_of(pid):
            # The report follows the spawner's waitpid; the bound is only a safety net.
            status = sp.wait(pid, timeout=SPAWNER_REPORT_S)
            if status is not None:
                log.debug("process %d exited with status %d (reaped by the spawner)", pid, status)
                return status
            # The spawner died before reaping it; now that it is gone (``wait`` returns
            # only then), the process is the daemon's child.
            return _reap(pid, pidfd)
        ppid = procinfo.parent(pid)
        if ppid is None:
            log.info("process %d exited (already reaped by its parent)", pid)
        else:
            log.info("process %d exited (its parent, pid %d, collects it)", pid, ppid)
        return None

    def kill_cgroup(self, cid: str) -> None:
        cg = self.cgroup(cid)
        if cg is not None:
            cg.kill()

    def release(self, cid: str) -> None:
        """Remove the cgroup and the mount point of a stopped container; data stays."""
        cg = self.cgroup(cid)
        if cg is not None:
            cg.destroy()
        _remove_tree(self.run_dir / "containers" / cid)

    def remove(self, cid: str, ephemeral: bool = False) -> None:
        """Remove everything of a stopped container, its data included."""
        self.release(cid)
        _remove_tree(self.dirs(cid, ephemeral).base)


# What a container's directories hold when its processes wrote nothing (see dirs()),
# deepest first.
_EMPTY_LAYOUT = ("rootfs", "work/work", "work", "upper")


def _remove_tree(base: Path) -> None:
    """``shutil.rmtree(base)``, which costs 0.3 ms a directory in Python, after trying
    the plain rmdir of each directory a container that wrote nothing leaves: where
    one is missing that is fine, where one is not empty rmtree does the rest. No path
    here is the tenant's: base and its entries are ours (only their contents are the
    container's), and rmdir follows no link in the last component."""
    for rel in _EMPTY_LAYOUT:
        try:
            os.rmdir(base / rel)
        except FileNotFoundError:
            continue
        except OSError:
            break
    else:
        try:
            os.rmdir(base)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
    shutil.rmtree(base, ignore_errors=True)


def has_own_userns(pid: int) -> bool:
    """Whether process ``pid`` runs in a user namespace other than the daemon's (so an
    exec joins it): asked of the process, not the config, which may have changed."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/user")
    except FileNotFoundError as exc:
        raise NotFound("container process is gone") from exc
    ours = os.stat("/proc/self/ns/user")
    return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)


def _reap(pid: int, pidfd: int) -> int | None:
    status = procinfo.reap_pidfd(pidfd)
    if status is not None:
        log.info("process %d exited with status %d (reaped by the daemon)", pid, status)
    return status


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (readable pidfd)."""
    import select

    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if poller.poll(left * 1000):
            return True


@contextlib.contextmanager
def spawner_running() -> Iterator[Spawner]:
    sp = Spawner()
    try:
        yield sp
    finally:
        sp.close()
