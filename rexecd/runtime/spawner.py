"""The spawner: a single-threaded helper process that forks every container child.

The daemon is multi-threaded and must never fork itself, so at start-up it runs
``python -m rexecd.runtime.spawner FD`` (through subprocess, which execs at once)
and sends it requests over a SEQPACKET socket. The spawner is a child subreaper:
container inits and exec'd processes re-parent to it, it reaps them and reports
``Exited(pid, status)``. It dies with its parent (PDEATHSIG and EOF), which leaves
running containers alive for a new daemon to re-adopt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from rexecd import _native as n
from rexecd.errors import ChildSetupError, RuntimeUnavailable
from rexecd.runtime import capabilities, sync, userns
from rexecd.runtime.spec import ContainerSpec, ExecSpec, UsernsSpec

log = logging.getLogger(__name__)

# The pause in requests after which the spawner makes its spare user namespace holder.
SPARE_IDLE_S = 0.02
# A file the spawner appends one line per child to, when set in its environment: the
# monotonic time (ns) at which each set-up step began, from the request's arrival to
# execve (``bench/start_latency.py --phases`` reads it). Off by default.
TRACE_ENV = "REXECD_START_TRACE"
_TRACE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

# ---------------------------------------------------------------- server side


def load_init_memfd() -> int:
    """rexec-init in a sealed memfd: container inits and exec'd processes exec it
    without any host path, and a process inside can never write to it through
    /proc/PID/exe."""
    path = resources.files("rexecd._native").joinpath("rexec-init")
    data = path.read_bytes()
    fd = n.memfd_create("rexec-init")
    os.write(fd, data)
    fcntl.fcntl(
        fd,
        fcntl.F_ADD_SEALS,
        fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
    )
    return fd


class _Server:
    def __init__(self, ctrl: socket.socket, spare: bool = True) -> None:
        self.ctrl = ctrl
        self.init_fd = load_init_memfd()
        trace = os.environ.get(TRACE_ENV)
        self.trace_fd = os.open(trace, _TRACE_FLAGS, 0o600) if trace else -1
        capabilities.last_cap()  # cached for every child
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.pid = os.getpid()
        # User namespace holders (see userns.fork_holder) not reaped yet.
        self.holders: set[int] = set()
        # A holder made ahead of the next start in a user namespace (``spare``: once a
        # start has asked for one), so that a start does not wait for its fork and
        # unshare. Made after a request is answered.
        self.spare_wanted = spare
        self.spare: userns.Holder | None = None
        self.userns_seen = False
        self.last_request = 0.0
        self.received = 0
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def serve(self) -> None:
        while True:
            timeout = self.spare_wait()
            try:
                ready, _, _ = select.select([self.ctrl.fileno(), self.wake_r], [], [], timeout)
            except InterruptedError:
                continue
            if not ready:
                self.make_spare()
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                self.reap()
            if self.ctrl.fileno() in ready:
                self.received = time.monotonic_ns()
                msg, fds = sync.recv(self.ctrl)
                if msg is None:
                    self.drop_holders()
                    return  # the daemon went away: leave containers running
                if isinstance(msg, sync.Request):
                    self.handle(msg, fds)
                    self.last_request = time.monotonic()
                else:
                    for fd in fds:
                        os.close(fd)

    def spare_wait(self) -> float | None:
        """How long to wait before making the spare holder; None: no spare due. It is
        made once requests have paused for SPARE_IDLE_S: its fork and unshare would
        otherwise compete for the CPU with the start that used the last one."""
        if self.spare is not None or not (self.spare_wanted and self.userns_seen):
            return None
        return max(0.0, self.last_request + SPARE_IDLE_S - time.monotonic())

    def make_spare(self) -> None:
        if self.spare_wait() is None:
            return
        try:
            self.spare = self.holder()
        except OSError as exc:
            log.warning("spare user namespace holder: %s", exc)
            self.spare_wanted = False  # the same would fail at every pause

    def holder(self) -> userns.Holder:
        h = userns.fork_holder(report=self.ctrl)
        self.holders.add(h.pid)
        return h

    def drop_holders(self) -> None:
        """End every holder and reap it: none is left to the daemon. Killed, not only
        released: a child still before its exec holds a copy of the spare's release
        pipe. Their pids are valid: unreaped children of ours."""
        if self.spare is not None:
            self.spare.discard()
            self.spare = None
        for pid in self.holders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.holders.clear()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.holders:
                self.holders.discard(pid)
                if self.spare is not None and self.spare.pid == pid:
                    # Died unused (killed): its pid is free for anyone now, never to be
                    # written a map through.
                    self.spare.discard()
                    self.spare = None
                # The daemon holds its pidfd (in case we die before reaping it).
                sync.send(self.ctrl, sync.Holder(pid=pid, reaped=True))
                continue
            sync.send(self.ctrl, sync.Exited(pid=pid, status=sync.exit_status(status)))

    def handle(self, req: sync.Request, fds: list[int]) -> None:
        # fds[0] is the child's end of the caller's sync socket; the rest are stdio.
        if not fds:
            sync.send(self.ctrl, sync.Reply(rid=req.rid, pid=None, error="no sync socket"))
            return
        child_sock = socket.socket(fileno=fds[0])
        stdio = fds[1:]
        try:
            pid = self.fork_child(req, child_sock, stdio)
            sync.send(self.ctrl, sync.Reply(rid=req.rid, pid=pid))
        except Exception as exc:
            sync.send(self.ctrl, sync.Reply(rid=req.rid, pid=None, error=str(exc)))
        finally:
            child_sock.close()
            for fd in stdio:
                os.close(fd)

    def userns_fds(self, rng: UsernsSpec) -> userns.UsernsFds:
        """The namespaces of a new container mapped to ``rng``: the spare's if there is
        one (a spare that died, killed by someone, is replaced by a fresh holder)."""
        self.userns_seen = True
        spare, self.spare = self.spare, None
        if spare is not None:
            try:
                return spare.namespaces(rng)
            except OSError as exc:
                log.warning("spare user namespace holder %d unusable: %s", spare.pid, exc)
        return self.holder().namespaces(rng)

    def fork_child(self, req: sync.Request, sock: socket.socket, stdio: list[int]) -> int:
        """Fork one child straight into its final pid namespace.

        ``unshare(CLONE_NEWPID)`` (or ``setns`` into a container's pid namespace) only
        changes where the spawner's *next* child is born, so a container needs a single
        fork; the spawner then resets that to its own namespace so no later fork can
        land in a container by mistake.
        """
        from rexecd.runtime import child

        body: ContainerSpec | ExecSpec
        pidfd = -1
        nsfds: userns.UsernsFds | None = None
        if req.op == "run":
            body = ContainerSpec.from_dict(req.body)
            if body.userns is not None:
                # Before the pid namespace: the holder must not become its init.
                nsfds = self.userns_fds(body.userns)
            try:
                n.unshare(n.CLONE_NEWPID)
            except OSError:
                if nsfds is not None:
                    nsfds.close()
                raise
        elif req.op == "exec":
            body = ExecSpec.from_dict(req.body)
            # Opened here: the child is born inside the container's pid namespace,
            # where the host pid means nothing. It inherits this fd to join the rest.
            pidfd = os.pidfd_open(body.container_pid)
            n.setns(pidfd, n.CLONE_NEWPID)
        else:
            raise ValueError(f"unknown op {req.op!r}")
        if self.trace_fd >= 0:
            child.trace(
                self.trace_fd,
                body.id if isinstance(body, ContainerSpec) else f"exec-{req.rid}",
                [("request", self.received), ("fork", time.monotonic_ns())],
            )
        try:
            pid = os.fork()
        except OSError:
            n.setns(self.own_pidns, n.CLONE_NEWPID)
            raise
        finally:
            if os.getpid() == self.pid:
                if pidfd >= 0:
                    os.close(pidfd)
                if nsfds is not None:
                    nsfds.close()
        if pid == 0:
            try:
                self.ctrl.close()
                if isinstance(body, ContainerSpec):
                    child.container_init(body, sock, stdio, self.init_fd, nsfds)
                else:
                    child.exec_in_container(body, sock, stdio, pidfd, self.init_fd)
            finally:
                os._exit(126)
        n.setns(self.own_pidns, n.CLONE_NEWPID)
        return pid


def main(argv: list[str]) -> None:
    import prctl

    prctl.set_name("rexecd-spawner")
    prctl.set_child_subreaper(True)
    prctl.set_pdeathsig(signal.SIGKILL)
    ctrl = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(ctrl.fileno(), False)
    if os.getppid() == 1:
        return  # parent already gone
    try:
        _Server(ctrl, spare="--no-spare" not in argv[2:]).serve()
    except (BrokenPipeError, ConnectionResetError):
        # The daemon went away while we reported an exit: nothing to tell anyone, and
        # the containers we leave are re-adopted by the next daemon.
        return


# ---------------------------------------------------------------- client side

MAX_UNCOLLECTED_EXITS = 4096
# A holder dies with the spawner (SIGKILL): this only bounds a wait on a wedged kernel.
HOLDER_EXIT_S = 5.0


@dataclass
class Child:
    """A freshly spawned process: its host pid and the caller's end of the sync socket."""

    pid: int
    sock: socket.socket

    def expect(
        self, kind: type[sync.Message], timeout: float | None = None
    ) -> tuple[sync.Message, list[int]]:
        """Wait for message ``kind``; a ChildError becomes ChildSetupError naming its step.
        With ``timeout``, a child silent for that long is a ChildSetupError too."""
        msg, fds = self._recv(timeout, f"a {kind.__name__}")
        if isinstance(msg, sync.ChildError):
            raise ChildSetupError(msg.step, msg.message, msg.errno)
        if msg is None:
            raise ChildSetupError("sync", "child exited before it was ready")
        if not isinstance(msg, kind):
            raise ChildSetupError("sync", f"unexpected message {msg.type!r}")
        return msg, fds

    def wait_exec(self, timeout: float | None = None) -> None:
        """Return once the child has exec'd (its end closed), or raise its error."""
        msg, fds = self._recv(timeout, "its exec")
        for fd in fds:
            os.close(fd)
        if isinstance(msg, sync.ChildError):
            raise ChildSetupError(msg.step, msg.message, msg.errno)
        if msg is not None:
            raise ChildSetupError("sync", f"unexpected message {msg.type!r}")

    def _recv(self, timeout: float | None, what: str) -> tuple[sync.Message | None, list[int]]:
        # A child stuck in a container (frozen, or blocked on something the tenant made)
        # must not hold the daemon's thread for good.
        self.sock.settimeout(timeout)
        try:
            return sync.recv(self.sock)
        except TimeoutError:
            raise ChildSetupError(
                "sync", f"no answer from the child in {timeout:g}s ({what})"
            ) from None
        finally:
            self.sock.settimeout(None)

    def raise_reported(self, cause: BaseException) -> None:
        """``cause`` (a failed step of ours between Ready and Go) is often only a symptom
        of the child having failed first: raise the child's own error if it sent one."""
        self.sock.settimeout(1.0)
        try:
            msg, fds = sync.recv(self.sock)
        except OSError:
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if isinstance(msg, sync.ChildError):
            raise ChildSetupError(msg.step, msg.message, msg.errno) from cause
        raise cause

    def close(self) -> None:
        self.sock.close()


class Spawner:
    """Client of the spawner process; thread-safe. Exit statuses arrive as events."""

    def __init__(self, spare_userns: bool = True) -> None:
        """``spare_userns`` False: no user namespace holder made ahead (to measure
        what a start costs without one)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        flags = [] if spare_userns else ["--no-spare"]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rexecd.runtime.spawner", str(theirs.fileno()), *flags],
            pass_fds=[theirs.fileno()],
            close_fds=True,
            # Its stdout/stderr are the daemon's log, for its own errors; a child never
            # keeps any of the three (see child._null_stdio).
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._rid = 0
        self._replies: dict[int, sync.Reply] = {}
        # Exit statuses not yet collected, oldest first; bounded so that statuses nobody
        # asks for (a waiter that gave up) cannot accumulate forever.
        self._exits: OrderedDict[int, int] = OrderedDict()
        # Children this spawner started and has not reported: it is their parent, and
        # the one to say how they ended.
        self._children: set[int] = set()
        self._listeners: list[Callable[[int, int], None]] = []
        # Pidfds of the spawner's user namespace holders not reaped yet: re-parented to
        # the daemon if the spawner dies, they are reaped here then.
        self._holders: dict[int, int] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="spawner-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """False once the spawner process has gone (its socket closed)."""
        with self._cond:
            return not self._closed

    def is_parent_of(self, pid: int) -> bool:
        """Whether ``pid`` is a child this spawner started and reaps (or has reaped)."""
        with self._cond:
            return pid in self._children or pid in self._exits

    def add_exit_listener(self, fn: Callable[[int, int], None]) -> None:
        """``fn(pid, status)`` is called from the reader thread for every reaped process."""
        with self._cond:
            self._listeners.append(fn)

    def _read_loop(self) -> None:
        while True:
            try:
                msg, fds = sync.recv(self._sock)
            except OSError:
                msg, fds = None, []
            if isinstance(msg, sync.Holder):
                self._track_holder(msg, fds)
                continue
            for fd in fds:
                os.close(fd)
            if msg is None:
                self._collect_process()
            with self._cond:
                if msg is None:
                    self._closed = True
                    self._cond.notify_all()
                    return
                if isinstance(msg, sync.Reply):
                    self._replies[msg.rid] = msg
                elif isinstance(msg, sync.Exited):
                    self._children.discard(msg.pid)
                    self._exits[msg.pid] = msg.status
                    while len(self._exits) > MAX_UNCOLLECTED_EXITS:
                        self._exits.popitem(last=False)
                    listeners = list(self._listeners)
                else:
                    continue
                self._cond.notify_all()
            if isinstance(msg, sync.Exited):
                for fn in listeners:
                    fn(msg.pid, msg.status)

    def _track_holder(self, msg: sync.Holder, fds: list[int]) -> None:
        keep = fds[0] if fds and not msg.reaped else -1
        for fd in fds:
            if fd != keep:
                os.close(fd)
        if keep >= 0:
            self._holders[msg.pid] = keep
        elif msg.reaped and (gone := self._holders.pop(msg.pid, -1)) >= 0:
            os.close(gone)

    def _collect_process(self) -> None:
        """Reap the spawner process once its socket closed. Only then are the children it
        left re-parented to the daemon (a subreaper), so whoever wakes on ``alive``
        turning False can wait for them itself; and no dead spawner stays a zombie."""
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("spawner process %d closed its socket but did not exit", self.pid)
        self._reap_holders()

    def _reap_holders(self) -> None:
        """The holders the spawner left: they die with it (PDEATHSIG), as children of the
        daemon now; a holder the spawner reaped already is not ours (ECHILD)."""
        holders, self._holders = self._holders, {}
        for pid, fd in holders.items():
            try:
                ready, _, _ = select.select([fd], [], [], HOLDER_EXIT_S)
                if not ready:
                    log.warning("user namespace holder %d outlived the spawner", pid)
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    select.select([fd], [], [], HOLDER_EXIT_S)
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except OSError as exc:
                log.warning("user namespace holder %d: %s", pid, exc)
            finally:
                os.close(fd)

    def _request(self, op: str, body: dict[str, object], stdio: list[int] | None) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._cond:
                if self._closed:
                    raise RuntimeUnavailable("spawner process is not running")
                self._rid += 1
                rid = self._rid
            with self._send_lock:
                sync.send(
                    self._sock,
                    sync.Request(op=op, rid=rid, body=body),
                    [theirs.fileno(), *(stdio or [])],
                )
        except OSError as exc:
            ours.close()
            raise RuntimeUnavailable(f"spawner unreachable: {exc}") from exc
        finally:
            theirs.close()
        with self._cond:
            while rid not in self._replies and not self._closed:
                self._cond.wait()
            reply = self._replies.pop(rid, None)
        if reply is None:
            ours.close()
            raise RuntimeUnavailable("spawner process exited")
        if reply.pid is None:
            # The child may have said why before it died.
            try:
                Child(0, ours).expect(sync.Ready)
            finally:
                ours.close()
            raise ChildSetupError("spawn", reply.error or "child exited during set-up")
        with self._cond:
            if reply.pid not in self._exits:
                self._children.add(reply.pid)
        return Child(reply.pid, ours)

    def run(self, spec: ContainerSpec, stdio: list[int] | None = None) -> Child:
        """Start a new container's init; the caller then expects Ready, sends Go, waits exec."""
        return self._request("run", spec.to_dict(), stdio)

    def exec(self, spec: ExecSpec, stdio: list[int] | None = None) -> Child:
        """Start a process inside a running container."""
        return self._request("exec", spec.to_dict(), stdio)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """The exit status of ``pid`` once the spawner reaped it (None on timeout)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: pid in self._exits or self._closed, timeout)
            if not ok:
                return None
            return self._exits.pop(pid, None)

    def poll(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def close(self) -> None:
        """Stop the spawner; running containers are left alone."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        self._sock.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)


if __name__ == "__main__":
    main(sys.argv)
