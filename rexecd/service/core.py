"""The core of the container manager: shared state, launch/halt with rollback, watching."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rexecd import logs
from rexecd.config import Config, TierLimits
from rexecd.errors import (
    ContainerNotFound,
    InvalidRequest,
    NotFound,
    RexecError,
    RuntimeUnavailable,
)
from rexecd.models import (
    ContainerCreate,
    ContainerRecord,
    ContainerResources,
    Event,
    FileInfo,
    StreamProgress,
    utcnow,
)
from rexecd.runtime import lxcfs, procinfo, userns
from rexecd.runtime.cgroups import CgroupLimits, IoLimit
from rexecd.runtime.container import KILL_WAIT_S, ContainerDirs, ImageView, Runtime
from rexecd.runtime.containerfs import Entry, mode_string
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.runtime.images.files import rmtree
from rexecd.runtime.seccomp import DEFAULT as DEFAULT_SECCOMP
from rexecd.runtime.spec import BindMount, ContainerSpec, UsernsSpec
from rexecd.runtime.storage import Storage, Volume
from rexecd.runtime.users import resolve_user
from rexecd.service import catalog, quotas
from rexecd.service.auth import Principal
from rexecd.service.containerlogs import ContainerLogs
from rexecd.service.events import EventBus
from rexecd.service.exits import ProcessExits
from rexecd.service.initguard import InitGuard
from rexecd.service.interface import ProgressFn
from rexecd.service.portforwards import PortForwards
from rexecd.service.registry import Puller
from rexecd.service.store import Store
from rexecd.service.storethread import in_store_thread
from rexecd.service.terminals import TerminalRegistry
from rexecd.service.volumes import KeptVolumes

log = logging.getLogger(__name__)
# The lifecycle log line's event for each published event kind.
_LIFECYCLE = {
    "created": "create",
    "started": "start",
    "stopped": "stop",
    "deleted": "delete",
    "updated": "update",
    "oom": "oom-kill",
}

MiB = 1024 * 1024
HOME = "/home/user"
SHELLS = ("/bin/zsh", "/usr/bin/zsh", "/bin/bash", "/usr/bin/bash", "/bin/sh")
EXPIRY_CHECK_S = 10.0
ACTIVE = ("creating", "configuring", "running")
OOM_RECHECK_S = (0.05, 0.2, 0.5, 1.0)


def limits_for(
    res: ContainerResources,
    pids_max: int = 512,
    *,
    disk: tuple[int, int] | None = None,
    disk_mbps: int | None = None,
    disk_iops: int | None = None,
) -> CgroupLimits:
    """The cgroup policy of a container's resources (cpu in millicores, memory in MB),
    with the tier's disk throttle on block device ``disk`` (major, minor), if any."""
    io: list[IoLimit] = []
    if disk is not None and (disk_mbps is not None or disk_iops is not None):
        bps = None if disk_mbps is None else disk_mbps * MiB
        io.append(
            IoLimit(
                major=disk[0], minor=disk[1], rbps=bps, wbps=bps, riops=disk_iops, wiops=disk_iops
            )
        )
    return CgroupLimits(
        cpu_millicores=res.cpu_shares,
        cpu_weight=max(1, min(10000, res.cpu_shares // 10)),
        memory_bytes=res.memory_mb * MiB,
        pids_max=pids_max,
        io=io,
    )


def _file_info(e: Entry) -> FileInfo:
    return FileInfo(
        name=e.name,
        path=e.path,
        size=e.size,
        mode=mode_string(e.mode),
        mod_time=e.mtime,
        is_dir=e.is_dir,
    )


@dataclass
class _InitWatch:
    """A running container's init as the daemon watches it: its pidfd, and the future
    its exit status (None when another process is its parent) is set on."""

    pid: int
    pidfd: int
    exited: asyncio.Future[int | None]


@dataclass
class _Started:
    """What ``_start_init`` has made so far, for the caller's undo."""

    dirs: ContainerDirs | None = None
    ip: str | None = None
    attached: bool = False
    pid: int = 0
    seccomp: str = DEFAULT_SECCOMP
    # The container's user namespace ids, leased by the start (None: no user namespace).
    rng: UsernsSpec | None = None


class _Reporter:
    """Sends StreamProgress frames to an optional callback; never fails the create."""

    def __init__(self, fn: ProgressFn | None) -> None:
        self.fn = fn

    async def __call__(self, stage: str, message: str, progress: int, **extra: Any) -> None:
        if self.fn is None:
            return
        frame = StreamProgress.model_validate(
            {"stage": stage, "message": message, "progress": progress, **extra}
        )
        try:
            await self.fn(frame)
        except Exception:  # a gone SSE client must not break creation
            log.debug("progress receiver failed", exc_info=True)
            self.fn = None


class ManagerCore:
    """The state and steps the manager's parts share: plumbing, images, and the launch,
    halt and watch of one container with its record, kernel objects and events kept in
    step."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        runtime: Runtime,
        images: ImageStore,
        events: EventBus | None = None,
        network: Any | None = None,
        storage: Storage | None = None,
        *,
        forwarder: Any | None = None,
        no_cgroups_reason: str = "",
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self.images = images
        self.puller = Puller(cfg.registries, images)
        self.events = events or EventBus()
        self.network = network
        # None: upper/work and /home/user are plain directories without a size limit.
        self.storage = storage
        self.port_forwards = PortForwards(cfg, store, forwarder)
        # Why runtime.cgroups is None (what probing found), for the 503 and /health.
        self._no_cgroups_reason = no_cgroups_reason or "no cgroup driver"
        self.volumes = KeptVolumes(cfg, store, storage)
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating: dict[str, asyncio.Task[None]] = {}
        # Role builds in progress, by cache key: their lock and how many creates wait.
        self._role_builds: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._inits: dict[str, _InitWatch] = {}
        self._oom_fds: dict[str, int] = {}
        self._oom_seen: dict[str, int] = {}
        self._cpu_prev: dict[str, tuple[float, int]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.init_guard = InitGuard(store)
        self._guarding = False
        # Exec and terminal processes are awaited on the loop, never in a worker thread.
        self.exits = ProcessExits(runtime)
        self.logs = ContainerLogs(cfg.state_dir, cfg.logs.max_bytes)
        self._log_ids: dict[str, str] = {}
        # Whether lxcfs was found at the last start (None: not looked yet); logged on change.
        self._lxcfs_seen: bool | None = None
        self.terminals = TerminalRegistry(
            cfg.terminal.scrollback_bytes, float(cfg.terminal.idle_timeout_s)
        )

    # ------------------------------------------------------------ limits

    def limits_missing(self) -> str | None:
        """What stops containers from having cgroup limits, or None when they have them."""
        if self.runtime.cgroups is not None:
            return None
        return f"cgroups unavailable: {self._no_cgroups_reason}"

    def degraded(self) -> str | None:
        """Why the daemon is not fully serving (``/health`` says "degraded"), or None."""
        missing = self.limits_missing()
        if missing is None:
            return None
        if self.cfg.cgroup.allow_unlimited:
            return f"{missing}: containers run without limits (cgroup.allow_unlimited)"
        return f"{missing}: containers are not started"

    def _require_limits(self) -> None:
        """Refuse to start a container that would run without limits (fail closed),
        unless the config explicitly allows it (``cgroup.allow_unlimited``)."""
        missing = self.limits_missing()
        if missing is not None and not self.cfg.cgroup.allow_unlimited:
            raise RuntimeUnavailable(
                f"containers cannot start: {missing}, so no cpu, memory or pids limit would hold",
                reason=missing,
            )

    # ------------------------------------------------------------ plumbing

    def _lock(self, db_id: str) -> asyncio.Lock:
        lock = self._locks.get(db_id)
        if lock is None:
            lock = self._locks[db_id] = asyncio.Lock()
        return lock

    async def _find(self, p: Principal, ref: str) -> ContainerRecord:
        rec = await in_store_thread(self.store.find_container, p.user_id, ref)
        if rec is None:
            raise ContainerNotFound("container not found")
        return rec

    async def _update(self, db_id: str, **fields: Any) -> ContainerRecord:
        return await in_store_thread(self.store.update_container, db_id, **fields)

    def _publish(
        self,
        kind: str,
        rec: ContainerRecord,
        *,
        lifecycle: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Publish the event ``kind`` and write its lifecycle log line (``lifecycle``
        names the line's event when it is not the kind's: an exit, an expiry)."""
        event = Event.model_validate(
            {"type": kind, "container": rec.to_out(), "timestamp": utcnow()}
        )
        self.events.publish(rec.user_id, event)
        self._spawn(self._log_lifecycle(lifecycle or _LIFECYCLE.get(kind, kind), rec, detail))
        self._spawn(
            in_store_thread(
                self.store.append_event,
                kind,
                {"name": rec.name, "status": rec.status},
                user_id=rec.user_id,
                container_db_id=rec.db_id,
                ts=utcnow(),
                keep=self.cfg.retention.events_max_rows,
            )
        )

    async def _stage_progress(
        self, rec: ContainerRecord, report: _Reporter, stage: str, message: str, pct: int
    ) -> None:
        """A create's progress at ``stage``: a stream frame and a ``progress`` event."""
        await report(stage, message, pct, container_id=rec.id)
        self.events.publish(
            rec.user_id,
            Event(
                type="progress",
                container=rec.to_out(),
                timestamp=utcnow(),
                stage=stage,
                message=message,
                progress=pct,
            ),
        )

    async def _log_lifecycle(self, event: str, rec: ContainerRecord, detail: str | None) -> None:
        user = await in_store_thread(self.store.get_user, rec.user_id)
        logs.lifecycle(event, rec, detail, user.name if user is not None else None)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def container_limit(self, p: Principal) -> int:
        return quotas.container_limit(self.cfg, p.tier)

    # ------------------------------------------------------------ images

    def _resolve(self, req: ContainerCreate) -> tuple[catalog.Resolved, ImageRecord | None]:
        """What the request's image is, and its record when it is local (blocking).
        Raises UnsupportedImage (400, saying how to get it) when it is neither local
        nor pullable."""
        resolved = catalog.resolve(self.cfg, req.image, req.custom_image)
        try:
            return resolved, self.images.get(resolved.local)
        except NotFound:
            if resolved.pull is None:
                asked = resolved.local if req.image == catalog.CUSTOM else req.image
                raise catalog.unsupported(self.cfg, asked, self._supported()) from None
            return resolved, None

    def _image_of(self, rec: ContainerRecord) -> ImageRecord:
        """The image ``rec`` was made from: its lease, which a re-pull of the name does
        not move (blocking). A container made before leases existed is pinned to what
        its name means now."""
        pinned = self.images.pinned(rec.id)
        if pinned is not None:
            return pinned
        try:
            image = self.images.get(catalog.resolve(self.cfg, rec.image, None).local)
        except (NotFound, InvalidRequest):
            raise catalog.unsupported(self.cfg, rec.image, self._supported()) from None
        self.images.pin(rec.id, image)
        return image

    def _supported(self) -> list[str]:
        names = []
        for rec in self.images.list():
            names.append(rec.name if rec.tag == "latest" else rec.ref)
        return sorted(set(names))

    def _view(self, image: ImageRecord) -> ImageView:
        c = image.config
        return ImageView(
            layers=self.images.layer_paths(image),
            env=list(c.env),
            entrypoint=c.entrypoint,
            cmd=c.cmd,
            working_dir=c.working_dir,
            user=c.user,
        )

    # ------------------------------------------------------------ launch / halt

    def _volume_dir(self, rec: ContainerRecord) -> Path:
        return self.volumes.plain_dir(rec.user_id, rec.name)

    def _vol(self, rec: ContainerRecord) -> Volume | None:
        return self.storage.volume(rec.user_id, rec.name) if self.storage is not None else None

    def _prepare(
        self, rec: ContainerRecord, view: ImageView, rng: UsernsSpec | None
    ) -> tuple[ContainerDirs, list[BindMount]]:
        """Storage, dirs and /home/user: everything on disk before the spawn.

        With a storage method the writable layer and /home/user live on the
        container's own quota'd volume (mounted here, released when it stops). With a
        user namespace (``rng``) both belong to the container's id range: a tree last
        written in another range (or without one) is moved into it once, here."""
        ident = resolve_user(view.user, view.layers)
        owner = (userns.host_id(rng, ident.uid), userns.host_id(rng, ident.gid))
        if self.storage is not None:
            vol = self.storage.ensure(rec.user_id, rec.name, rec.resources.disk_mb, owner)
            self.store.upsert_volume(rec.user_id, rec.name, str(vol.image), vol.size_mb)
            dirs = replace(self.runtime.dirs(rec.id), upper=vol.upper, work=vol.work)
            home = vol.home
        else:
            dirs = self.runtime.dirs(rec.id)
            home = self._volume_dir(rec)
            if not home.exists():
                home.mkdir(parents=True, mode=0o755)
                os.chown(home, *owner)
            self.store.upsert_volume(rec.user_id, rec.name, str(home), rec.resources.disk_mb)
        if rng is not None:
            # ensure() gave home's top its owner already; the upper dir (fresh and host
            # root's after a wipe, the range's after a run) tells whose the volume is.
            marker = dirs.upper if self.storage is not None else home
            self._into_range(rng, marker, dirs.upper, home)
        self.runtime.create_dirs(dirs, rng)
        return dirs, [BindMount(source=str(home), target=HOME), *self._lxcfs_binds()]

    def _lxcfs_binds(self) -> list[BindMount]:
        """lxcfs's /proc files for a starting container, when lxcfs runs (looked up at
        each start: it may be started or stopped while the daemon runs)."""
        if self.cfg.lxcfs.mode == "off":
            return []
        binds = lxcfs.proc_binds(self.cfg.lxcfs.dir)
        found = bool(binds)
        if found != self._lxcfs_seen:
            self._lxcfs_seen = found
            if found:
                log.info(
                    "lxcfs at %s: containers see their own limits in /proc", self.cfg.lxcfs.dir
                )
            else:
                log.warning(
                    "lxcfs is not mounted at %s: containers see the host's memory and cpus "
                    "in free and top (install and start the lxcfs package, or set lxcfs.mode: off)",
                    self.cfg.lxcfs.dir,
                )
        return binds

    def _into_range(self, rng: UsernsSpec, marker: Path, *trees: Path) -> None:
        """Shift ``trees`` into ``rng`` unless ``marker``'s owner is in it already."""
        try:
            if rng.base <= os.lstat(marker).st_uid < rng.base + rng.size:
                return
        except FileNotFoundError:
            pass
        for tree in trees:
            if os.path.lexists(tree):
                moved = userns.shift_tree(tree, rng, self.cfg.userns.base)
                log.info("moved %d files of %s into ids %d+%d", moved, tree, rng.base, rng.size)

    async def _launch(
        self, rec: ContainerRecord, image: ImageRecord, report: _Reporter | None = None
    ) -> ContainerRecord:
        """Start ``rec``'s container; on failure undo every step and re-raise."""
        self._require_limits()
        view = await asyncio.to_thread(self._view, image)
        st = _Started()
        try:
            # The init's stdout and stderr: the container's log (rexec logs).
            stdio = await asyncio.to_thread(self.logs.open_capture, rec.id)
            try:
                spec = await self._start_init(
                    rec,
                    view,
                    st,
                    env=[f"{k}={v}" for k, v in rec.environment.items()] + ["TERM=xterm-256color"],
                    stdio=stdio,
                    report=report,
                )
            finally:
                for fd in set(stdio):
                    os.close(fd)
            if report is not None:
                await report("configuring", "configuring the environment", 85, container_id=rec.id)
            now = utcnow()
            rec = await self._update(
                rec.db_id,
                status="running",
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
        except BaseException:
            await asyncio.to_thread(self._undo_launch, rec, st.attached, st.rng is not None)
            self.logs.drop_capture(rec.id)  # the pipe made for an init that never ran
            raise
        self._watch(rec)
        self._publish("started", rec)
        return rec

    async def _start_init(
        self,
        rec: ContainerRecord,
        view: ImageView,
        st: _Started,
        *,
        env: list[str],
        args: list[str] | None = None,
        user: str | None = None,
        stdio: list[int] | None = None,
        home: bool = True,
        network: str | None = None,
        hostname: str | None = None,
        report: _Reporter | None = None,
    ) -> ContainerSpec:
        """Id range, storage, address, /etc files, cgroup limits and the spawn of ``rec``'s init,
        filling ``st`` as it goes so that the caller can undo (``_undo_launch``) after
        any failure. ``args`` runs a command instead of an idle init; ``home`` binds
        /home/user; ``network`` and ``hostname`` override the record's."""
        hostname = hostname or rec.name
        if (ranges := self.runtime.userns) is not None:
            slot = await asyncio.to_thread(
                self.store.allocate_userns,
                rec.db_id,
                ranges.count,
                per_user=self.cfg.userns.mode == "user",
            )
            st.rng = ranges.range(slot)
        dirs, mounts = await asyncio.to_thread(self._prepare, rec, view, st.rng)
        st.dirs = dirs
        if self.network is not None and (network or rec.network_mode) == "default":
            st.ip = str(
                await asyncio.to_thread(self.store.allocate_ip, rec.db_id, self.cfg.network.subnet)
            )
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
        # The owner's tier: its seccomp profile stays the container's until it stops.
        tier = await asyncio.to_thread(self._owner_tier, rec)
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
        ip = st.ip

        def on_ready(pid: int) -> None:
            if ip is not None and self.network is not None:
                self.network.attach(
                    rec.id, pid, ip, rec.resources.network_mbps, group=rec.user_id[:8]
                )
                st.attached = True

        # After _prepare: the volume the io throttle names is mounted by now.
        limits = await asyncio.to_thread(self._limits, rec, rec.resources, tier)
        st.pid = await asyncio.to_thread(
            self.runtime.start, spec, limits, on_ready=on_ready, stdio=stdio
        )
        return spec

    def _owner_tier(self, rec: ContainerRecord) -> TierLimits:
        """The current tier of ``rec``'s owner. Blocking (database): run it in a thread."""
        user = self.store.get_user(rec.user_id)
        if user is None:
            raise NotFound(f"the owner of container {rec.name} no longer exists")
        return quotas.tier_limits(self.cfg, user.tier)

    def _limits(
        self, rec: ContainerRecord, res: ContainerResources, tier: TierLimits | None = None
    ) -> CgroupLimits:
        """``limits_for`` with this daemon's pids cap and the owner's current tier's disk
        throttle on the volume's device (``tier``, when the caller read it already).
        Blocking (database, stat): run it in a thread."""
        tier = tier or self._owner_tier(rec)
        return limits_for(
            res,
            self.cfg.limits.pids_max,
            disk=self._volume_device(rec),
            disk_mbps=tier.disk_mbps,
            disk_iops=tier.disk_iops,
        )

    def _volume_device(self, rec: ContainerRecord) -> tuple[int, int] | None:
        """(major, minor) of the block device under ``rec``'s mounted volume, if any.

        Only a volume of its own gives a container a device to throttle: without one
        its files share the host's file system, often on a partition, which io.max
        refuses, and a throttle there would slow the host's own writes too."""
        vol = self._vol(rec)
        if vol is None:
            return None
        try:
            if not os.path.ismount(vol.mountpoint):
                log.warning("volume of %s is not mounted: no disk throttle", rec.name)
                return None
            dev = os.stat(vol.mountpoint).st_dev
        except OSError as exc:
            log.warning("volume of %s: %s: no disk throttle", rec.name, exc)
            return None
        # Major 0 is an anonymous device (tmpfs, overlay): no block queue to throttle.
        return (os.major(dev), os.minor(dev)) if os.major(dev) != 0 else None

    def _undo_launch(self, rec: ContainerRecord, attached: bool, leased: bool = False) -> None:
        self._undo_start(rec, attached)
        if leased and rec.started_at is None:
            # A container that never ran has no files in its range yet; one that ran
            # keeps the range its files are owned by.
            self.store.release_userns(rec.db_id)
        self._release_volume(rec)

    def _undo_start(self, rec: ContainerRecord, attached: bool) -> None:
        """Network side, address, cgroup and mount point of a start; the volume stays."""
        if attached and self.network is not None:
            with contextlib.suppress(Exception):
                self.network.detach(rec.id)
        self.store.release_ips(rec.db_id)
        self.runtime.release(rec.id)

    def _release(self, rec: ContainerRecord) -> None:
        """After init is gone: cgroup, mount point and host network side go; data stays."""
        self.port_forwards.release(rec)
        if self.network is not None:
            try:
                self.network.detach(rec.id)
            except RexecError as exc:
                log.warning("network detach of %s: %s", rec.id, exc)
        self.runtime.release(rec.id)
        self._release_volume(rec)

    def _wipe_root(self, rec: ContainerRecord) -> None:
        """Empty the container's writable layer (upper and work dirs); /home/user stays."""
        vol = self._vol(rec)
        if vol is not None and self.storage is not None:
            if vol.image.exists():
                self.storage.wipe_root(vol)
                self.storage.release(vol)
            return
        dirs = self.runtime.dirs(rec.id)
        for d in (dirs.upper, dirs.work):
            if d.exists():
                rmtree(d)

    def _release_volume(self, rec: ContainerRecord) -> None:
        vol = self._vol(rec)
        if vol is not None and self.storage is not None:
            try:
                self.storage.release(vol)
            except RexecError as exc:
                log.warning("releasing the volume of %s: %s", rec.name, exc)

    async def _halt(
        self,
        rec: ContainerRecord,
        timeout: float,
        status: str = "stopped",
        reason: str | None = None,
    ) -> ContainerRecord:
        self.terminals.close_container(rec.db_id, "container_status", f"container {status}")
        if rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time):
            await self._terminate(rec, rec.pid, timeout)
        self._unwatch(rec.db_id)
        await asyncio.to_thread(self._release, rec)
        rec = await self._update(
            rec.db_id, status=status, pid=None, pid_start_time=None, error_message=reason
        )
        if status == "expired":
            self._publish("stopped", rec, lifecycle="exit", detail="cause=session-expiry")
        else:
            self._publish("stopped", rec, detail=f"({reason})" if reason else None)
        return rec

    async def _terminate(self, rec: ContainerRecord, pid: int, timeout: float) -> None:
        """SIGTERM to init, SIGKILL to the whole container after ``timeout`` seconds.

        Woken by init's exit as its watcher sees it (which also collects the status
        and frees the zombie): no worker thread waits on a process the tenant controls.
        """
        watch = self._inits.get(rec.db_id)
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

    # ------------------------------------------------------------ watching

    def _watch(self, rec: ContainerRecord) -> None:
        """Notice when init exits (pidfd: works for adopted containers too), when it is
        stopped (the init guard continues it) and OOM kills."""
        assert rec.pid is not None
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            self._spawn(self._on_exit(rec.db_id, rec.pid, None))
            return
        watch = _InitWatch(rec.pid, pidfd, loop.create_future())
        self._inits[rec.db_id] = watch
        self._log_ids[rec.db_id] = rec.id
        self.logs.watch(rec.id, rec.pid)
        loop.add_reader(pidfd, self._init_exited, rec.db_id, watch)
        self.init_guard.watch(rec.db_id, rec.pid, pidfd, rec.name, rec.user_id)
        if not self._guarding:
            self._guarding = True
            self._spawn(self.init_guard.run())
        cg = self.runtime.cgroup(rec.id)
        if cg is not None:
            fd = cg.oom_fd()
            if fd is not None:
                self._oom_fds[rec.db_id] = fd
                self._oom_seen[rec.db_id] = cg.stats().oom_kills
                loop.add_reader(fd, lambda: self._on_oom(rec.db_id, rec.id, fd))

    def _init_exited(self, db_id: str, watch: _InitWatch) -> None:
        # A pidfd stays readable once its process has exited: one wake-up is enough.
        asyncio.get_running_loop().remove_reader(watch.pidfd)
        self._spawn(self._collect_exit(db_id, watch))

    async def _collect_exit(self, db_id: str, watch: _InitWatch) -> None:
        """Collect the status of an init that exited (reaping it if the daemon is its
        parent), wake a stop waiting for it, and record the exit if nobody stopped it."""
        # A duplicate: _unwatch may close the watch's own fd while the thread uses it.
        fd = os.dup(watch.pidfd)
        try:
            status = await asyncio.to_thread(self.runtime.exit_status, watch.pid, fd)
        except Exception:
            log.exception("collecting the exit of init %d", watch.pid)
            status = None
        finally:
            os.close(fd)
        if not watch.exited.done():
            watch.exited.set_result(status)
        await self._on_exit(db_id, watch.pid, status)

    def _unwatch(self, db_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.init_guard.forget(db_id)  # before its pidfd closes
        cid = self._log_ids.pop(db_id, None)
        if cid is not None:
            self.logs.unwatch(cid)
        watch = self._inits.pop(db_id, None)
        if watch is not None:
            loop.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.exited.cancel()
        fd = self._oom_fds.pop(db_id, None)
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)
        # Per run: the next start has a new cgroup with counters from zero.
        self._oom_seen.pop(db_id, None)
        self._cpu_prev.pop(db_id, None)

    def _on_oom(self, db_id: str, cid: str, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.read(fd, 4096)
        if self._check_oom(db_id, cid):
            return
        # v1 wakes the eventfd as the OOM starts, a moment before the kill is counted:
        # look again shortly rather than miss it.
        loop = asyncio.get_running_loop()
        for delay in OOM_RECHECK_S:
            loop.call_later(delay, self._check_oom, db_id, cid)

    def _check_oom(self, db_id: str, cid: str) -> bool:
        """Publish an ``oom`` event if the kill counter grew; True if it did."""
        if db_id not in self._oom_fds:
            return False  # stopped meanwhile
        cg = self.runtime.cgroup(cid)
        if cg is None:
            return False
        kills = cg.stats().oom_kills
        if kills <= self._oom_seen.get(db_id, 0):
            return False
        self._oom_seen[db_id] = kills
        self._spawn(self._publish_oom(db_id))
        return True

    async def _publish_oom(self, db_id: str) -> None:
        rec = await in_store_thread(self.store.get_container, db_id)
        if rec is not None:
            self._publish("oom", rec)

    async def _on_exit(self, db_id: str, pid: int, status: int | None) -> None:
        async with self._lock(db_id):
            rec = await in_store_thread(self.store.get_container, db_id)
            if rec is None or rec.pid != pid or rec.status != "running":
                # Already handled by stop/delete, or an exit of an older incarnation.
                if rec is None or rec.pid == pid:
                    self._unwatch(db_id)
                return
            oom = self._oom_seen.get(db_id, 0) > 0
            reason = None
            if oom and status is not None and status == 128 + 9:
                reason = "init was killed by the out-of-memory killer"
            elif status not in (None, 0):
                reason = f"container init exited with status {status}"
            self._unwatch(db_id)
            await asyncio.to_thread(self._release, rec)
            rec = await self._update(
                db_id, status="stopped", pid=None, pid_start_time=None, error_message=reason
            )
            self._publish("stopped", rec, lifecycle="exit", detail=logs.exit_detail(status, oom))
