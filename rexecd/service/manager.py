"""ContainerManager: every container's lifecycle, with quota, rollback and reconcile.

It owns the rules (who may do what to which container, in which state) and keeps
the SQLite record, the kernel objects and the events in step. Kernel work goes
through ``runtime`` in worker threads; each container has an asyncio lock so two
requests never change one container at once. A failed create leaves no cgroup,
veth, mount or IP lease behind: each step registers its undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from rexecd import __version__
from rexecd import _native as n
from rexecd.config import Config
from rexecd.errors import (
    ChildSetupError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RexecError,
    RuntimeFailure,
    UnsupportedImage,
)
from rexecd.models import (
    ContainerCreate,
    ContainerOut,
    ContainerRecord,
    ContainerResources,
    Event,
    ExecRequest,
    FileInfo,
    FileList,
    Health,
    ImageInfo,
    ImportResult,
    Role,
    SettingsPatch,
    Stats,
    StreamProgress,
    utcnow,
)
from rexecd.runtime import procinfo
from rexecd.runtime.cgroups import CgroupLimits, IoLimit
from rexecd.runtime.container import ContainerDirs, ImageView, Runtime, merge_env
from rexecd.runtime.containerfs import ContainerFS, Entry, mode_string
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.runtime.pty import set_size
from rexecd.runtime.spec import BindMount, ProcessSpec
from rexecd.runtime.storage import Storage, Volume
from rexecd.runtime.users import resolve_user
from rexecd.service import quotas
from rexecd.service.auth import Principal
from rexecd.service.events import EventBus
from rexecd.service.execution import run_exec
from rexecd.service.interface import FileDownload, ProgressFn, TerminalProcess
from rexecd.service.names import generate_name
from rexecd.service.store import Store
from rexecd.service.terminals import TerminalRegistry, TerminalSession

log = logging.getLogger(__name__)

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


class ContainerManager:
    """The real ``ContainerService``."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        runtime: Runtime,
        images: ImageStore,
        events: EventBus | None = None,
        network: Any | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self.images = images
        self.events = events or EventBus()
        self.network = network
        # None: upper/work and /home/user are plain directories without a size limit.
        self.storage = storage
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._watch_fds: dict[str, int] = {}
        self._oom_fds: dict[str, int] = {}
        self._oom_seen: dict[str, int] = {}
        self._cpu_prev: dict[str, tuple[float, int]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.terminals = TerminalRegistry(
            cfg.terminal.scrollback_bytes, float(cfg.terminal.idle_timeout_s)
        )

    # ------------------------------------------------------------ plumbing

    def _lock(self, db_id: str) -> asyncio.Lock:
        lock = self._locks.get(db_id)
        if lock is None:
            lock = self._locks[db_id] = asyncio.Lock()
        return lock

    async def _find(self, p: Principal, ref: str) -> ContainerRecord:
        rec = await asyncio.to_thread(self.store.find_container, p.user_id, ref)
        if rec is None:
            raise NotFound("container not found", code="container_not_found")
        return rec

    async def _update(self, db_id: str, **fields: Any) -> ContainerRecord:
        return await asyncio.to_thread(self.store.update_container, db_id, **fields)

    def _publish(self, kind: str, rec: ContainerRecord) -> None:
        event = Event.model_validate(
            {"type": kind, "container": rec.to_out(), "timestamp": utcnow()}
        )
        self.events.publish(rec.user_id, event)
        self._spawn(
            asyncio.to_thread(
                self.store.append_event,
                kind,
                {"name": rec.name, "status": rec.status},
                user_id=rec.user_id,
                container_db_id=rec.db_id,
                ts=utcnow(),
            )
        )

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

    async def list_images(self) -> list[ImageInfo]:
        imported = await asyncio.to_thread(self.images.list)
        have = {r.name for r in imported}
        out = [
            ImageInfo(
                name=c.name,
                display_name=c.display_name,
                description=c.description,
                category=c.category,
                tags=list(c.tags),
                popular=c.popular,
                available=c.name in have,
            )
            for c in self.cfg.images.catalogue
        ]
        listed = {c.name for c in self.cfg.images.catalogue}
        for r in imported:
            if r.name not in listed:
                listed.add(r.name)
                out.append(
                    ImageInfo(
                        name=r.name,
                        display_name=r.name,
                        description=f"imported image {r.ref}",
                        category="custom",
                        tags=[r.tag],
                        popular=False,
                        available=True,
                    )
                )
        return out

    async def import_image(self, src: BinaryIO, name: str | None) -> ImportResult:
        rec = await asyncio.to_thread(self.images.import_archive, src, name)
        return ImportResult(name=rec.ref, digest=rec.digest, size=rec.size, layers=len(rec.layers))

    def roles(self) -> list[Role]:
        return [
            Role(id=r.id, name=r.name, description=r.description, packages=list(r.packages))
            for r in self.cfg.roles
        ]

    # ------------------------------------------------------------ queries

    async def list_containers(self, p: Principal) -> list[ContainerOut]:
        recs = await asyncio.to_thread(self.store.list_containers, p.user_id)
        now = utcnow()
        return [r.to_out(now) for r in recs]

    async def get_container(self, p: Principal, ref: str) -> ContainerOut:
        return (await self._find(p, ref)).to_out()

    async def health(self) -> Health:
        counts = await asyncio.to_thread(self.store.container_counts)
        drv = self.runtime.cgroups
        return Health(
            status="ok",
            containers_total=sum(counts.values()),
            containers_running=counts.get("running", 0),
            cgroup=f"v{drv.version}" if drv is not None else "none",
            version=__version__,
        )

    def subscribe(self, p: Principal) -> AsyncIterator[Event]:
        return self.events.subscribe(p.user_id)

    # ------------------------------------------------------------ create

    async def create_container(
        self, p: Principal, req: ContainerCreate, progress: ProgressFn | None = None
    ) -> ContainerOut:
        report = _Reporter(progress)
        ref = self._image_ref(req)
        image = await asyncio.to_thread(self._image, ref)
        if req.role is not None and req.role not in {r.id for r in self.cfg.roles}:
            raise InvalidRequest(
                f"unknown role {req.role!r}", supported_roles=[r.id for r in self.cfg.roles]
            )
        resources = quotas.resources_for_create(self.cfg, p.tier, req)
        now = utcnow()
        rec = ContainerRecord(
            user_id=p.user_id,
            name=req.name or await self._free_name(p),
            image=ref,
            role=req.role,
            resources=resources,
            environment=dict(req.environment),
            labels=dict(req.labels),
            network_mode=req.network_mode or self.cfg.network.mode_default,
            created_at=now,
            last_used_at=now,
            expires_at=quotas.session_expiry(self.cfg, p.tier, now),
        )
        await asyncio.to_thread(self.store.insert_container_checked, rec, self.container_limit(p))
        # Only now: the first frame starts the SSE answer, so a refusal above (image,
        # quota, name taken) still reaches a stream client as a plain JSON error.
        await report("validating", "request validated", 5, container_id=rec.id)
        self._publish("created", rec)
        task = asyncio.ensure_future(self._finish_create(rec, image, report))
        self._creating[rec.db_id] = task
        db_id = rec.db_id

        def forget(_t: asyncio.Task[None]) -> None:
            self._creating.pop(db_id, None)

        task.add_done_callback(forget)
        return rec.to_out(async_=True)

    async def _free_name(self, p: Principal) -> str:
        taken = {r.name for r in await asyncio.to_thread(self.store.list_containers, p.user_id)}
        return generate_name(taken=taken)

    async def wait_ready(self, p: Principal, ref: str, timeout: float) -> ContainerOut:
        rec = await self._find(p, ref)
        task = self._creating.get(rec.db_id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return (await self._find(p, ref)).to_out()

    async def _finish_create(
        self, rec: ContainerRecord, image: ImageRecord, report: _Reporter
    ) -> None:
        async with self._lock(rec.db_id):
            try:
                await report("pulling", f"image {image.ref} is present", 20, container_id=rec.id)
                await report(
                    "creating", "preparing the container's storage", 40, container_id=rec.id
                )
                rec = await self._launch(rec, image, report)
            except Exception as exc:  # recorded and reported, never lost
                if not isinstance(exc, RexecError):
                    log.exception("create of %s failed", rec.id)
                message = exc.message if isinstance(exc, RexecError) else "internal error"
                rec = await self._update(
                    rec.db_id, status="error", error_message=message, pid=None, pid_start_time=None
                )
                self._publish("updated", rec)
                await report(
                    "starting",
                    f"create failed: {message}",
                    100,
                    error=message,
                    container_id=rec.id,
                    container=rec.to_out(),
                )
                return
        await report(
            "ready",
            "container is running",
            100,
            complete=True,
            container_id=rec.id,
            container=rec.to_out(),
        )

    # ------------------------------------------------------------ launch / halt

    def _volume_dir(self, rec: ContainerRecord) -> Path:
        return self.cfg.state_dir / "volumes" / rec.user_id / rec.name

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
        self._unwatch(rec.db_id)
        self.terminals.close_container(rec.db_id, "container_status", f"container {status}")
        if rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time):
            await asyncio.to_thread(self.runtime.stop, rec.id, rec.pid, timeout)
        await asyncio.to_thread(self._release, rec)
        rec = await self._update(
            rec.db_id, status=status, pid=None, pid_start_time=None, error_message=reason
        )
        self._publish("stopped", rec)
        return rec

    # ------------------------------------------------------------ watching

    def _watch(self, rec: ContainerRecord) -> None:
        """Notice when init exits (pidfd: works for adopted containers too) and OOM kills."""
        assert rec.pid is not None
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            self._spawn(self._on_exit(rec.db_id, rec.pid))
            return
        self._watch_fds[rec.db_id] = pidfd
        loop.add_reader(pidfd, lambda: self._spawn(self._on_exit(rec.db_id, rec.pid or 0)))
        cg = self.runtime.cgroup(rec.id)
        if cg is not None:
            fd = cg.oom_fd()
            if fd is not None:
                self._oom_fds[rec.db_id] = fd
                self._oom_seen[rec.db_id] = cg.stats().oom_kills
                loop.add_reader(fd, lambda: self._on_oom(rec.db_id, rec.id, fd))

    def _unwatch(self, db_id: str) -> None:
        loop = asyncio.get_running_loop()
        for table in (self._watch_fds, self._oom_fds):
            fd = table.pop(db_id, None)
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)

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
        rec = await asyncio.to_thread(self.store.get_container, db_id)
        if rec is not None:
            self._publish("oom", rec)

    async def _on_exit(self, db_id: str, pid: int) -> None:
        async with self._lock(db_id):
            rec = await asyncio.to_thread(self.store.get_container, db_id)
            if rec is None or rec.pid != pid or rec.status != "running":
                # Already handled by stop/delete, or an exit of an older incarnation.
                if rec is None or rec.pid == pid:
                    self._unwatch(db_id)
                return
            pidfd = self._watch_fds.get(db_id)
            status = procinfo.reap_pidfd(pidfd) if pidfd is not None else None
            if status is None:
                status = await asyncio.to_thread(self.runtime.spawner.wait, pid, 1.0)
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
            self._publish("stopped", rec)

    # ------------------------------------------------------------ lifecycle

    async def start_container(self, p: Principal, ref: str) -> ContainerOut:
        rec = await self._find(p, ref)
        async with self._lock(rec.db_id):
            rec = await self._find(p, ref)
            if rec.status == "running":
                raise Conflict("container is already running", status=rec.status)
            if rec.status in ("creating", "configuring"):
                raise Conflict("container is still being created", status=rec.status)
            if rec.status == "expired":
                exp = quotas.session_expiry(self.cfg, p.tier, rec.created_at)
                if exp is not None and exp <= utcnow():
                    raise Forbidden(
                        "container session expired: delete it or upgrade the tier",
                        code="session_expired",
                        tier=p.tier,
                    )
                rec = await self._update(rec.db_id, expires_at=exp)
            image = await asyncio.to_thread(self._image, rec.image)
            rec = await self._launch(rec, image)
        return rec.to_out()

    async def stop_container(self, p: Principal, ref: str, timeout: float | None) -> ContainerOut:
        rec = await self._find(p, ref)
        async with self._lock(rec.db_id):
            rec = await self._find(p, ref)
            if rec.status != "running":
                raise Conflict("container is not running", status=rec.status)
            rec = await self._halt(rec, self._timeout(timeout))
        return rec.to_out()

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return float(self.cfg.stop_timeout_s)
        if timeout < 0:
            raise InvalidRequest("timeout must not be negative")
        return min(float(timeout), 300.0)

    async def restart_container(self, p: Principal, ref: str) -> ContainerOut:
        rec = await self._find(p, ref)
        async with self._lock(rec.db_id):
            rec = await self._find(p, ref)
            if rec.status in ("creating", "configuring"):
                raise Conflict("container is still being created", status=rec.status)
            if rec.status == "expired":
                raise Forbidden(
                    "container session expired: delete it or upgrade the tier",
                    code="session_expired",
                    tier=p.tier,
                )
            if rec.status == "running":
                rec = await self._halt(rec, float(self.cfg.stop_timeout_s))
            image = await asyncio.to_thread(self._image, rec.image)
            rec = await self._launch(rec, image)
        return rec.to_out()

    async def delete_container(self, p: Principal, ref: str, volumes: bool) -> ContainerOut:
        rec = await self._find(p, ref)
        task = self._creating.get(rec.db_id)
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        async with self._lock(rec.db_id):
            rec = await self._find(p, ref)
            if rec.status == "running":
                rec = await self._halt(rec, float(self.cfg.stop_timeout_s))
            await asyncio.to_thread(self._remove, rec, volumes)
            self._locks.pop(rec.db_id, None)
        self._publish("deleted", rec)
        return rec.to_out()

    def _remove(self, rec: ContainerRecord, volumes: bool) -> None:
        self._release(rec)
        self.runtime.remove(rec.id)
        if self.storage is not None:
            if volumes:
                self.storage.destroy(rec.user_id, rec.name)
            elif (vol := self.storage.volume(rec.user_id, rec.name)).image.exists():
                # The container's root goes; /home/user stays for the same name.
                self.storage.wipe_root(vol)
                self.storage.release(vol)
        elif volumes:
            shutil.rmtree(self._volume_dir(rec), ignore_errors=True)
        if volumes:
            self.store.delete_volume(rec.user_id, rec.name)
        self.store.delete_container(rec.db_id)

    async def update_settings(
        self, p: Principal, ref: str, patch: SettingsPatch
    ) -> tuple[ContainerOut, bool]:
        """cpu and memory change live; the disk grows online where the storage can (else
        at the next start); a rename of a running container with quota'd storage restarts
        it, since its volume is mounted under its name."""
        rec = await self._find(p, ref)
        restarted = False
        async with self._lock(rec.db_id):
            rec = await self._find(p, ref)
            res = quotas.resources_for_update(self.cfg, p.tier, rec.resources, patch)
            if self.storage is not None and res.disk_mb < rec.resources.disk_mb:
                raise InvalidRequest(
                    "disk_mb can only grow: a volume cannot be shrunk without moving the "
                    "user's data",
                    disk_mb=rec.resources.disk_mb,
                )
            fields: dict[str, Any] = {"resources": res}
            old = rec
            renaming = patch.name is not None and patch.name != rec.name
            if renaming:
                assert patch.name is not None
                fields["name"] = patch.name
                taken = await asyncio.to_thread(self.store.find_container, p.user_id, patch.name)
                if taken is not None and taken.name == patch.name:
                    raise Conflict("container with this name already exists", name=patch.name)
                if await asyncio.to_thread(self._volume_exists, p.user_id, patch.name):
                    raise Conflict(
                        "a kept /home/user volume already has this name", name=patch.name
                    )
            restart = renaming and rec.status == "running" and self.storage is not None
            if restart:
                rec = await self._halt(rec, float(self.cfg.stop_timeout_s))
            elif rec.status == "running":
                cg = self.runtime.cgroup(rec.id)
                if cg is not None:
                    # The whole policy, io included: apply() lifts whatever it is not given.
                    limits = await asyncio.to_thread(self._limits, rec, res)
                    await asyncio.to_thread(cg.apply, limits)
                if res.disk_mb > old.resources.disk_mb:
                    await asyncio.to_thread(self._grow_disk, rec, res.disk_mb)
            rec = await self._update(rec.db_id, **fields)
            if renaming:
                # The volume is found by (user, name): it follows the container's name,
                # or the next start would mount an empty /home/user.
                await asyncio.to_thread(self._move_volume, old, rec)
            if restart:
                image = await asyncio.to_thread(self._image, rec.image)
                rec = await self._launch(rec, image)
                restarted = True
            self._publish("updated", rec)
        return rec.to_out(), restarted

    def _grow_disk(self, rec: ContainerRecord, disk_mb: int) -> None:
        vol = self._vol(rec)
        if vol is None or self.storage is None:
            return
        try:
            self.storage.resize(vol, disk_mb)
        except Conflict as exc:
            # No online grow here (e.g. no CAP_SYS_RESOURCE): ensure() grows it offline
            # at the next start, from the size now recorded.
            log.info("disk of %s grows at its next start: %s", rec.name, exc.message)

    def _volume_exists(self, user_id: str, name: str) -> bool:
        if self.storage is not None:
            return self.storage.volume(user_id, name).image.exists()
        return (self.cfg.state_dir / "volumes" / user_id / name).exists()

    def _move_volume(self, old: ContainerRecord, new: ContainerRecord) -> None:
        if self.storage is not None:
            self.storage.rename(old.user_id, old.name, new.name)
            dst = self.storage.volume(new.user_id, new.name).image
            if not dst.exists():
                return
        else:
            src, dst = self._volume_dir(old), self._volume_dir(new)
            if not src.exists():
                return
            # A running container's bind mount follows the directory it was made from.
            os.rename(src, dst)
        self.store.delete_volume(old.user_id, old.name)
        self.store.upsert_volume(new.user_id, new.name, str(dst), new.resources.disk_mb)

    # ------------------------------------------------------------ inside a container

    async def _running(self, p: Principal, ref: str) -> ContainerRecord:
        rec = await self._find(p, ref)
        if rec.status != "running" or rec.pid is None:
            raise Conflict("container is not running", status=rec.status, code="container_stopped")
        return rec

    async def _touch(self, rec: ContainerRecord) -> None:
        await self._update(rec.db_id, last_used_at=utcnow())

    def _ids(self, rec: ContainerRecord, user: str | None) -> tuple[int, int, list[int]]:
        if user is None:
            return int(rec.spec.get("uid", 0)), int(rec.spec.get("gid", 0)), []
        assert rec.pid is not None
        ident = resolve_user(user, [Path(f"/proc/{rec.pid}/root")])
        return ident.uid, ident.gid, ident.additional_gids

    async def exec(self, p: Principal, ref: str, req: ExecRequest) -> tuple[int, dict[str, object]]:
        rec = await self._running(p, ref)
        assert rec.pid is not None
        uid, gid, groups = await asyncio.to_thread(self._ids, rec, req.user)
        env = list(rec.spec.get("env", [])) + list(req.env)
        proc = ProcessSpec(
            args=req.argv(),
            env=merge_env([], env),
            cwd=req.workdir or HOME,
            uid=uid,
            gid=gid,
            additional_gids=groups,
        )
        await self._touch(rec)
        try:
            code, result = await run_exec(
                self.runtime,
                rec.id,
                rec.pid,
                proc,
                float(quotas.exec_timeout(self.cfg, req.timeout_seconds)),
                self.cfg.exec.output_cap_bytes,
            )
        except ChildSetupError:
            # Exec takes no lock (it may run for minutes): a stop or delete that won the
            # race is the caller's 409/404, not a server fault.
            await self._gone_while_entering(rec)
            raise
        return code, result.model_dump(mode="json")

    async def _gone_while_entering(self, rec: ContainerRecord) -> None:
        """Raise NotFound/Conflict if ``rec`` was deleted or stopped under a request."""
        async with self._lock(rec.db_id):  # a stop under way finishes first
            now = await asyncio.to_thread(self.store.get_container, rec.db_id)
        if now is None:
            raise NotFound("container not found", code="container_not_found")
        alive = rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time)
        if now.status != "running" or now.pid != rec.pid or not alive:
            raise Conflict("container is not running", status=now.status, code="container_stopped")

    async def stats(self, p: Principal, ref: str) -> Stats:
        rec = await self._find(p, ref)
        return await asyncio.to_thread(self._stats, rec)

    def _stats(self, rec: ContainerRecord) -> Stats:
        res = rec.resources
        disk_used = self._disk_used(rec)
        cg = self.runtime.cgroup(rec.id) if rec.status == "running" else None
        if cg is None:
            return Stats(
                cpu_percent=0.0,
                cpu_usage_usec=0,
                memory=0,
                memory_limit=res.memory_mb * MiB,
                pids=0,
                disk_read=0,
                disk_write=0,
                disk_usage=disk_used,
                disk_limit=self._disk_limit(rec),
                net_rx=0,
                net_tx=0,
                oom_kills=0,
            )
        s = cg.stats()
        now = time.monotonic()
        prev = self._cpu_prev.get(rec.db_id)
        self._cpu_prev[rec.db_id] = (now, s.cpu_usage_usec)
        pct = 0.0
        if prev is not None and now > prev[0]:
            pct = max(0.0, (s.cpu_usage_usec - prev[1]) / ((now - prev[0]) * 1e6) * 100.0)
        rx, tx = _net_counters(rec.pid) if rec.pid else (0, 0)
        return Stats(
            cpu_percent=round(pct, 2),
            cpu_usage_usec=s.cpu_usage_usec,
            memory=s.memory,
            memory_limit=s.memory_limit or res.memory_mb * MiB,
            pids=s.pids,
            disk_read=s.io_read_bytes,
            disk_write=s.io_write_bytes,
            disk_usage=disk_used,
            disk_limit=self._disk_limit(rec),
            net_rx=rx,
            net_tx=tx,
            oom_kills=s.oom_kills,
        )

    def _disk_limit(self, rec: ContainerRecord) -> int:
        """The quota in force: the volume's real size, which lags a requested grow that
        only happens at the next start (no online resize on this host)."""
        vol = self._vol(rec)
        if vol is not None:
            try:
                return vol.image.stat().st_size
            except FileNotFoundError:
                pass
        return rec.resources.disk_mb * MiB

    def _disk_used(self, rec: ContainerRecord) -> int:
        vol = self._vol(rec)
        if vol is None or self.storage is None:
            return _du(self.runtime.dirs(rec.id).upper) + _du(self._volume_dir(rec))
        if rec.status == "running":
            with contextlib.suppress(RexecError):
                return self.storage.usage(vol)[0]
        # Stopped: its image is not mounted; what the sparse image holds is close enough.
        try:
            return vol.image.stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    def _fs(self, rec: ContainerRecord) -> ContainerFS:
        assert rec.pid is not None
        return ContainerFS(rec.pid, int(rec.spec.get("uid", 0)), int(rec.spec.get("gid", 0)))

    async def list_files(self, p: Principal, ref: str, path: str) -> FileList:
        rec = await self._running(p, ref)

        def work() -> FileList:
            with self._fs(rec) as fs:
                entries = fs.list(path)
            return FileList(path=path, files=[_file_info(e) for e in entries], count=len(entries))

        return await asyncio.to_thread(work)

    async def open_file(self, p: Principal, ref: str, path: str) -> FileDownload:
        rec = await self._running(p, ref)

        def work() -> FileDownload:
            with self._fs(rec) as fs:
                entry, f = fs.open_read(path)
            return FileDownload(info=_file_info(entry), fileobj=f)

        return await asyncio.to_thread(work)

    async def upload_file(
        self,
        p: Principal,
        ref: str,
        directory: str,
        filename: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
    ) -> FileInfo:
        rec = await self._running(p, ref)
        fs = await asyncio.to_thread(self._fs, rec)
        try:
            up = await asyncio.to_thread(fs.begin_write, directory, filename)
            try:
                async for chunk in chunks:
                    if up.size + len(chunk) > max_bytes:
                        raise PayloadTooLarge("file too large", max_bytes=max_bytes)
                    await asyncio.to_thread(up.write, chunk)
                entry = await asyncio.to_thread(up.commit)
            except BaseException:
                await asyncio.to_thread(up.abort)
                raise
        finally:
            fs.close()
        await self._touch(rec)
        return _file_info(entry)

    async def delete_file(self, p: Principal, ref: str, path: str) -> None:
        rec = await self._running(p, ref)

        def work() -> None:
            with self._fs(rec) as fs:
                fs.delete(path)

        await asyncio.to_thread(work)

    async def make_dir(self, p: Principal, ref: str, path: str) -> FileInfo:
        rec = await self._running(p, ref)

        def work() -> FileInfo:
            with self._fs(rec) as fs:
                return _file_info(fs.mkdir(path))

        return await asyncio.to_thread(work)

    async def open_terminal(self, p: Principal, ref: str, cols: int, rows: int) -> TerminalProcess:
        rec = await self._running(p, ref)
        assert rec.pid is not None
        shell = await asyncio.to_thread(_find_shell, rec.pid)
        env = [e for e in rec.spec.get("env", []) if not e.startswith("TERM=")]
        proc = ProcessSpec(
            args=[shell, "-l"] if shell != "/bin/sh" else [shell],
            env=[*env, "TERM=xterm-256color"],
            cwd=HOME,
            uid=int(rec.spec.get("uid", 0)),
            gid=int(rec.spec.get("gid", 0)),
            tty=True,
        )
        child, master = await asyncio.to_thread(self.runtime.exec, rec.id, rec.pid, proc)
        assert master is not None
        set_size(master, cols or 80, rows or 24)
        await self._touch(rec)
        spawner = self.runtime.spawner

        async def wait() -> int | None:
            return await asyncio.to_thread(spawner.wait, child.pid, None)

        return TerminalProcess(master=master, pid=child.pid, pts="", wait=wait)

    async def terminal_session(
        self, p: Principal, ref: str, session_id: str, new: bool, cols: int, rows: int
    ) -> tuple[TerminalSession, bool]:
        """The session ``session_id`` of a running container, started if needed."""
        rec = await self._running(p, ref)

        async def start() -> TerminalProcess:
            return await self.open_terminal(p, ref, cols, rows)

        return await self.terminals.open(rec.db_id, session_id, new, start)

    # ------------------------------------------------------------ daemon life

    async def start_up(self) -> None:
        """Reconcile the records with the host after a (re)start, then start the timers."""
        await asyncio.to_thread(self._prepare_host)
        recs = await asyncio.to_thread(self.store.list_containers)
        live: set[str] = set()
        for rec in recs:
            if rec.status not in ACTIVE:
                continue
            alive = rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time)
            if alive and rec.status == "running":
                live.add(rec.id)
                self._watch(rec)
                log.info("re-adopted container %s (%s) pid %s", rec.name, rec.id[:12], rec.pid)
                continue
            if alive and rec.pid is not None:
                # Killed mid-create: what exists is half-built; take it down.
                await asyncio.to_thread(self.runtime.stop, rec.id, rec.pid, 0.0)
            await asyncio.to_thread(self._release, rec)
            if rec.status == "running":
                rec = await self._update(
                    rec.db_id,
                    status="stopped",
                    pid=None,
                    pid_start_time=None,
                    error_message="container stopped while the daemon was down",
                )
            else:
                await asyncio.to_thread(self.store.release_ips, rec.db_id)
                rec = await self._update(
                    rec.db_id,
                    status="error",
                    pid=None,
                    pid_start_time=None,
                    error_message="the daemon restarted during creation",
                )
            log.info("container %s (%s) marked %s", rec.name, rec.id[:12], rec.status)
        await asyncio.to_thread(self._sweep_orphans, live)
        self._spawn(self._expiry_loop())

    def _prepare_host(self) -> None:
        if self.runtime.cgroups is not None:
            self.runtime.cgroups.prepare()
        if self.network is not None:
            self.network.setup_host()

    def _sweep_orphans(self, live: set[str]) -> None:
        """Kernel objects of containers the records do not know as running go away."""
        if self.runtime.cgroups is not None:
            for name in self.runtime.cgroups.list():
                if name not in live:
                    log.info("removing orphaned cgroup %s", name)
                    with contextlib.suppress(NotFound):
                        self.runtime.cgroups.open(name).destroy()
        if self.storage is not None:
            keep = {(r.user_id, r.name) for r in self.store.list_containers() if r.id in live}
            released = self.storage.reconcile(keep)
            if released:
                log.info("released volumes of containers that are not running: %s", released)
        run_containers = self.runtime.run_dir / "containers"
        for d in run_containers.iterdir() if run_containers.exists() else []:
            if d.name not in live:
                shutil.rmtree(d, ignore_errors=True)
        if self.network is not None:
            removed = self.network.reconcile(live)
            if removed:
                log.info("removed orphaned network objects: %s", removed)

    async def _expiry_loop(self) -> None:
        while not self._closing:
            try:
                await self.expire_sessions(utcnow())
            except Exception:  # the loop must survive one bad pass
                log.exception("session expiry pass failed")
            await asyncio.sleep(EXPIRY_CHECK_S)

    async def expire_sessions(self, now: datetime) -> list[str]:
        """Stop (data kept) every running container whose session time is over."""
        expired = []
        for rec in await asyncio.to_thread(self.store.list_containers):
            if rec.status != "running" or not quotas.is_expired(rec.expires_at, now):
                continue
            async with self._lock(rec.db_id):
                cur = await asyncio.to_thread(self.store.get_container, rec.db_id)
                if cur is None or cur.status != "running":
                    continue
                await self._halt(
                    cur,
                    float(self.cfg.stop_timeout_s),
                    status="expired",
                    reason="session time is over",
                )
                expired.append(cur.id)
        return expired

    async def shut_down(self) -> None:
        """Stop watching; running containers are left alone for the next daemon."""
        self._closing = True
        for task in list(self._creating.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 30)
        for db_id in list(self._watch_fds) + list(self._oom_fds):
            self._unwatch(db_id)
        await self.terminals.close_all()
        for task in list(self._bg):
            task.cancel()
        self.events.close()


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


def _find_shell(pid: int) -> str:
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for shell in SHELLS:
            try:
                fd = n.openat2(
                    root,
                    shell.lstrip("/"),
                    os.O_PATH,
                    resolve=n.RESOLVE_IN_ROOT | n.RESOLVE_NO_MAGICLINKS,
                )
            except OSError:
                continue
            os.close(fd)
            return shell
    finally:
        os.close(root)
    raise RuntimeFailure("terminal", "no shell (zsh, bash or sh) in the container", errno.ENOENT)


def _du(path: Path) -> int:
    """Bytes allocated under ``path`` (without following links)."""
    total = 0
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total


def _net_counters(pid: int) -> tuple[int, int]:
    """Bytes received and sent on the container's non-loopback interfaces."""
    rx = tx = 0
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return 0, 0
    for line in lines:
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            continue
        fields = rest.split()
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx
