"""The manager's lifecycle part: launch one container (id range, storage, address,
/etc files, cgroup limits, spawn, network attach), each step pushing its undo so a
failure leaves nothing behind, and halt it again."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from rexecd.config import Config
from rexecd.models import ContainerRecord, utcnow
from rexecd.runtime import procinfo, userns
from rexecd.runtime.container import KILL_WAIT_S, ContainerDirs, ImageView, Runtime
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.runtime.seccomp import DEFAULT as DEFAULT_SECCOMP
from rexecd.runtime.spec import ContainerSpec, UsernsSpec
from rexecd.service.cancel import CancelToken
from rexecd.service.containerlogs import ContainerLogs
from rexecd.service.hostside import HostSide
from rexecd.service.limits import CgroupPolicy
from rexecd.service.oneshot import image_view
from rexecd.service.optional import ContainerNetwork
from rexecd.service.progress import Reporter
from rexecd.service.publisher import Publisher
from rexecd.service.records import Records
from rexecd.service.rollback import Rollback
from rexecd.service.states import State
from rexecd.service.store import Store
from rexecd.service.terminals import TerminalRegistry
from rexecd.service.watch import Watcher

log = logging.getLogger(__name__)

# A cancelled spawn: how often its cgroup is killed again while the start still runs
# (its child may join the cgroup only after a kill).
SPAWN_KILL_AGAIN_S = 0.5


def _never() -> None:
    """The check of a start nobody can cancel (start, restart, settings)."""


@dataclass
class Started:
    """What ``start_init`` has made so far, and the undo of each step."""

    undo: Rollback = field(default_factory=Rollback)
    dirs: ContainerDirs | None = None
    ip: str | None = None
    pid: int = 0
    seccomp: str = DEFAULT_SECCOMP
    # The container's user namespace ids, leased by the start (None: no user namespace).
    rng: UsernsSpec | None = None


@dataclass
class Lifecycle:
    cfg: Config
    store: Store
    runtime: Runtime
    images: ImageStore
    network: ContainerNetwork
    host: HostSide
    policy: CgroupPolicy
    records: Records
    publisher: Publisher
    watcher: Watcher
    logs: ContainerLogs
    terminals: TerminalRegistry

    async def launch(
        self,
        rec: ContainerRecord,
        image: ImageRecord,
        report: Reporter | None = None,
        token: CancelToken | None = None,
    ) -> ContainerRecord:
        """Start ``rec``'s container; on failure undo every step and re-raise. A
        cancelled ``token`` stops it at its next step (CreateCancelled, or the error of
        a spawn it cut short), with the same undo; an init already spawned stays for
        the delete to halt."""
        self.policy.require()
        view = await asyncio.to_thread(image_view, self.images, image)
        st = Started()
        try:
            # The init's stdout and stderr: the container's log (rexec logs).
            stdio = await asyncio.to_thread(self.logs.open_capture, rec.id)
            try:
                spec = await self.start_init(
                    rec,
                    view,
                    st,
                    env=[f"{k}={v}" for k, v in rec.environment.items()] + ["TERM=xterm-256color"],
                    stdio=stdio,
                    report=report,
                    token=token,
                )
            finally:
                for fd in set(stdio):
                    os.close(fd)
            if report is not None:
                await report("configuring", "configuring the environment", 85, container_id=rec.id)
            rec = await self._running(rec, st, spec)
        except BaseException:
            await asyncio.to_thread(st.undo.run)
            self.logs.drop_capture(rec.id)  # the pipe made for an init that never ran
            raise
        self.watcher.watch(rec)
        self.publisher.publish("started", rec)
        return rec

    async def _running(
        self, rec: ContainerRecord, st: Started, spec: ContainerSpec
    ) -> ContainerRecord:
        now = utcnow()
        return await self.records.move(
            rec.db_id,
            State.RUNNING,
            pid=st.pid,
            pid_start_time=procinfo.start_time(st.pid),
            started_at=now,
            last_used_at=now,
            ip_address=st.ip,
            error_message=None,
            # The profile stays the container's until it stops: its execs and
            # terminals get the same one, whatever the tier says meanwhile.
            spec={
                "uid": spec.process.uid,
                "gid": spec.process.gid,
                "env": spec.process.env,
                "seccomp": st.seccomp,
                # Host ids of the container's user namespace (files API owners).
                **({"userns_base": st.rng.base} if st.rng is not None else {}),
            },
        )

    async def start_init(
        self,
        rec: ContainerRecord,
        view: ImageView,
        st: Started,
        *,
        env: list[str],
        args: list[str] | None = None,
        user: str | None = None,
        stdio: list[int] | None = None,
        home: bool = True,
        network: str | None = None,
        hostname: str | None = None,
        report: Reporter | None = None,
        token: CancelToken | None = None,
    ) -> ContainerSpec:
        """Id range, storage, address, /etc files, cgroup limits and the spawn of
        ``rec``'s init, pushing each step's undo on ``st.undo`` as it goes: the caller
        runs it after any failure. ``args`` runs a command instead of an idle init;
        ``home`` binds /home/user; ``network`` and ``hostname`` override the record's.
        A cancelled ``token`` raises CreateCancelled between steps, never within one:
        each step in a thread either completes (its undo pushed) or never starts; the
        spawn, the one step that can wait on the container, is cut short by a kill."""
        check = token.check if token is not None else _never
        hostname = hostname or rec.name
        check()
        await self._lease_ids(rec, st)
        check()
        # Pushed before their step, which may fail halfway (a volume mounted, the
        # mount point made; a cgroup made, the spawn refused): both undos are safe
        # to run on what was never made.
        st.undo.push("volume", lambda: self.host.homes.release(rec), data=True)
        st.undo.push("runtime", lambda: self.runtime.release(rec.id))
        dirs, mounts = await asyncio.to_thread(self.host.prepare, rec, view, st.rng)
        st.dirs = dirs
        if self.cfg.network.enabled and (network or rec.network_mode) == "default":
            check()
            await self._address(rec, st, dirs, hostname)
        check()
        # The owner's tier: its seccomp profile stays the container's until it stops.
        tier = await asyncio.to_thread(self.policy.owner_tier, rec)
        st.seccomp = tier.seccomp
        spec = self.runtime.build_spec(
            rec.id,
            hostname,
            view,
            dirs,
            args=args,
            env=env,
            user=user,
            mounts=mounts if home else [],
            seccomp=st.seccomp,
            userns=st.rng,
        )
        if report is not None:
            await report("starting", "starting the container", 60, container_id=rec.id)
        # After prepare: the volume the io throttle names is mounted by now.
        limits = await asyncio.to_thread(self.policy.limits, rec, rec.resources, tier)
        check()
        starting = asyncio.to_thread(
            self.runtime.start, spec, limits, on_ready=self._attacher(rec, st), stdio=stdio
        )
        if token is None:
            st.pid = await starting
        else:
            # The thread is never left behind: a cancel kills the cgroup the child
            # joins, so a start stuck before its init is ready fails now (undone by the
            # runtime and by ``st.undo``); one that got through is the delete's to halt.
            st.pid = await token.cut_short(
                starting,
                lambda: asyncio.to_thread(self.runtime.kill_cgroup, rec.id),
                again_s=SPAWN_KILL_AGAIN_S,
            )
        return spec

    async def _lease_ids(self, rec: ContainerRecord, st: Started) -> None:
        if (ranges := self.runtime.userns) is None:
            return
        slot = await asyncio.to_thread(
            self.store.allocate_userns,
            rec.db_id,
            ranges.count,
            per_user=self.cfg.userns.mode == "user",
        )
        st.rng = ranges.range(slot)
        if rec.started_at is None:
            # A container that never ran has no files in its range yet; one that ran
            # keeps the range its files are owned by.
            st.undo.push("userns", lambda: self.store.release_userns(rec.db_id), data=True)

    async def _address(
        self, rec: ContainerRecord, st: Started, dirs: ContainerDirs, hostname: str
    ) -> None:
        """An address for ``rec`` and the /etc files that name it."""
        ip = await asyncio.to_thread(self.store.allocate_ip, rec.db_id, self.cfg.network.subnet)
        st.ip = str(ip)
        st.undo.push("address", lambda: self.store.release_ips(rec.db_id))
        await asyncio.to_thread(
            self.network.write_etc_files,
            dirs.upper / "etc",
            hostname,
            st.ip,
            [str(d) for d in self.cfg.network.dns],
        )
        if st.rng is not None:
            # Written by the daemon as host root: the container's root owns them.
            await asyncio.to_thread(
                userns.shift_tree, dirs.upper / "etc", st.rng, self.cfg.userns.base
            )

    def _attacher(self, rec: ContainerRecord, st: Started) -> Callable[[int], None]:
        ip = st.ip

        def on_ready(pid: int) -> None:
            if ip is not None:
                self.network.attach(
                    rec.id, pid, ip, rec.resources.network_mbps, group=rec.user_id[:8]
                )
                st.undo.push("attach", lambda: self.network.detach(rec.id))

        return on_ready

    async def halt(
        self,
        rec: ContainerRecord,
        timeout: float,
        status: State = State.STOPPED,
        reason: str | None = None,
    ) -> ContainerRecord:
        self.terminals.close_container(rec.db_id, "container_status", f"container {status}")
        if rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time):
            await self._terminate(rec, rec.pid, timeout)
        self.watcher.unwatch(rec.db_id)
        await asyncio.to_thread(self.host.release, rec)
        rec = await self.records.move(
            rec.db_id, status, pid=None, pid_start_time=None, error_message=reason
        )
        if status == State.EXPIRED:
            self.publisher.publish("stopped", rec, lifecycle="exit", detail="cause=session-expiry")
        else:
            self.publisher.publish("stopped", rec, detail=f"({reason})" if reason else None)
        return rec

    async def _terminate(self, rec: ContainerRecord, pid: int, timeout: float) -> None:
        """SIGTERM to init, SIGKILL to the whole container after ``timeout`` seconds.

        Woken by init's exit as its watcher sees it (which also collects the status
        and frees the zombie): no worker thread waits on a process the tenant controls.
        """
        watch = self.watcher.inits.get(rec.db_id)
        if watch is None or watch.pid != pid:
            await asyncio.to_thread(self.runtime.stop, rec.id, pid, timeout)
            return
        self.runtime.signal(watch.pidfd, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(watch.exited), timeout)
        except TimeoutError:
            await asyncio.to_thread(self.runtime.kill, rec.id, watch.pidfd)
            try:
                await asyncio.wait_for(asyncio.shield(watch.exited), KILL_WAIT_S)
            except TimeoutError:
                log.warning("init %d of %s still runs %gs after SIGKILL", pid, rec.id, KILL_WAIT_S)
        await asyncio.to_thread(self.runtime.kill_cgroup, rec.id)
