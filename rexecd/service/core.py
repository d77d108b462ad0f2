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
from rexecd.config import Config
from rexecd.errors import (
    InvalidRequest,
    NotFound,
    RexecError,
    RuntimeUnavailable,
    UnsupportedImage,
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
from rexecd.runtime import procinfo
from rexecd.runtime.cgroups import CgroupLimits, IoLimit
from rexecd.runtime.container import KILL_WAIT_S, ContainerDirs, ImageView, Runtime
from rexecd.runtime.containerfs import Entry, mode_string
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.runtime.spec import BindMount
from rexecd.runtime.storage import Storage, Volume
from rexecd.runtime.users import resolve_user
from rexecd.service import quotas
from rexecd.service.auth import Principal
from rexecd.service.events import EventBus
from rexecd.service.exits import ProcessExits
from rexecd.service.initguard import InitGuard
from rexecd.service.interface import ProgressFn
from rexecd.service.portforwards import PortForwards
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
            raise NotFound("container not found", code="container_not_found")
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

    def _image_ref(self, req: ContainerCreate) -> str:
        if req.image == "custom":
            if not req.custom_image:
                raise InvalidRequest("custom_image is required when image is 'custom'")
            return req.custom_image
        return req.image

    def _image(self, ref: str) -> ImageRecord:
        try:
            return self.images.get(ref)
        except NotFound:
            raise UnsupportedImage(
                "unsupported image type", image=ref, supported_images=self._supported()
            ) from None

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
        self, rec: ContainerRecord, view: ImageView
    ) -> tuple[ContainerDirs, list[BindMount]]:
        """Storage, dirs and /home/user: everything on disk before the spawn.

        With a storage method the writable layer and /home/user live on the
        container's own quota'd volume (mounted here, released when it stops)."""
        ident = resolve_user(view.user, view.layers)
        if self.storage is not None:
            vol = self.storage.ensure(
                rec.user_id, rec.name, rec.resources.disk_mb, (ident.uid, ident.gid)
            )
            self.store.upsert_volume(rec.user_id, rec.name, str(vol.image), vol.size_mb)
            dirs = replace(self.runtime.dirs(rec.id), upper=vol.upper, work=vol.work)
            self.runtime.create_dirs(dirs)
            return dirs, [BindMount(source=str(vol.home), target=HOME)]
        dirs = self.runtime.dirs(rec.id)
        self.runtime.create_dirs(dirs)
        home = self._volume_dir(rec)
        if not home.exists():
            home.mkdir(parents=True, mode=0o755)
            os.chown(home, ident.uid, ident.gid)
        self.store.upsert_volume(rec.user_id, rec.name, str(home), rec.resources.disk_mb)
        return dirs, [BindMount(source=str(home), target=HOME)]

    async def _launch(
        self, rec: ContainerRecord, image: ImageRecord, report: _Reporter | None = None
    ) -> ContainerRecord:
        """Start ``rec``'s container; on failure undo every step and re-raise."""
        self._require_limits()
        view = await asyncio.to_thread(self._view, image)
        ip: str | None = None
        attached = False
        try:
            dirs, mounts = await asyncio.to_thread(self._prepare, rec, view)
            if self.network is not None and rec.network_mode == "default":
                ip = str(
                    await asyncio.to_thread(
                        self.store.allocate_ip, rec.db_id, self.cfg.network.subnet
                    )
                )
                await asyncio.to_thread(
                    self.network.write_etc_files,
                    dirs.upper / "etc",
                    rec.name,
                    ip,
                    [str(d) for d in self.cfg.network.dns],
                )
            spec = self.runtime.build_spec(
                rec.id,
                rec.name,
                view,
                dirs,
                env=[f"{k}={v}" for k, v in rec.environment.items()] + ["TERM=xterm-256color"],
                mounts=mounts,
            )
            if report is not None:
                await report("starting", "starting the container", 60, container_id=rec.id)

            def on_ready(pid: int) -> None:
                nonlocal attached
                if ip is not None and self.network is not None:
                    self.network.attach(
                        rec.id, pid, ip, rec.resources.network_mbps, group=rec.user_id[:8]
                    )
                    attached = True

            # After _prepare: the volume the io throttle names is mounted by now.
            limits = await asyncio.to_thread(self._limits, rec, rec.resources)
            pid = await asyncio.to_thread(self.runtime.start, spec, limits, on_ready=on_ready)
            start = procinfo.start_time(pid)
            if report is not None:
                await report("configuring", "configuring the environment", 85, container_id=rec.id)
            now = utcnow()
            rec = await self._update(
                rec.db_id,
                status="running",
                pid=pid,
                pid_start_time=start,
                started_at=now,
                last_used_at=now,
                ip_address=ip,
                error_message=None,
                spec={"uid": spec.process.uid, "gid": spec.process.gid, "env": spec.process.env},
            )
        except BaseException:
            await asyncio.to_thread(self._undo_launch, rec, attached)
            raise
        self._watch(rec)
        self._publish("started", rec)
        return rec

    def _limits(self, rec: ContainerRecord, res: ContainerResources) -> CgroupLimits:
        """``limits_for`` with this daemon's pids cap and the owner's current tier's disk
        throttle on the volume's device. Blocking (database, stat): run it in a thread."""
        user = self.store.get_user(rec.user_id)
        if user is None:
            raise NotFound(f"the owner of container {rec.name} no longer exists")
        tier = quotas.tier_limits(self.cfg, user.tier)
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

    def _undo_launch(self, rec: ContainerRecord, attached: bool) -> None:
        if attached and self.network is not None:
            with contextlib.suppress(Exception):
                self.network.detach(rec.id)
        self.store.release_ips(rec.db_id)
        self.runtime.release(rec.id)
        self._release_volume(rec)

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
