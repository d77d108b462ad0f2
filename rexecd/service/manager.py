"""ContainerManager: the real ``ContainerService``, a façade over the parts it composes.

Each part is handed the collaborators it needs and nothing else:

- ``records`` (lookups, the per-container lock, state moves checked against
  ``states``), ``publisher`` (events), ``policy`` (cgroup limits, fail closed);
- ``host`` (what one run makes on disk and releases), over ``homes`` (quota'd volumes
  or plain dirs) and the optional ``network`` and forwarder (``optional``);
- ``lifecycle`` (launch with an undo stack, halt), ``watcher`` (init exits, OOM);
- ``ops`` (create, start, stop, restart, delete, settings, port forwards), ``inside``
  (exec, files, stats, terminals), ``imageops``, ``roles``, ``reconciler``.

A failed create leaves no cgroup, veth, mount or IP lease behind: each step of a
start pushes its undo (``rollback``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from rexecd import __version__
from rexecd.config import Config
from rexecd.models import (
    ContainerCreate,
    ContainerOut,
    Event,
    ExecRequest,
    ExecStreamStart,
    FileInfo,
    FileList,
    Health,
    ImageInfo,
    ImageRemoved,
    ImportResult,
    LocalImage,
    PortForwardCreate,
    PortForwardOut,
    PruneOut,
    PullOut,
    Role,
    SettingsPatch,
    Stats,
    VolumeList,
    utcnow,
)
from rexecd.runtime.container import Runtime
from rexecd.runtime.images import ImageStore
from rexecd.runtime.storage import Storage
from rexecd.service import quotas
from rexecd.service.auth import Principal
from rexecd.service.containerlogs import ContainerLogs
from rexecd.service.events import EventBus
from rexecd.service.execstream import StreamProcess
from rexecd.service.exits import ProcessExits
from rexecd.service.homes import homes_for
from rexecd.service.hostside import HostSide
from rexecd.service.imageops import ImageOps
from rexecd.service.initguard import InitGuard
from rexecd.service.inside import CpuMeter, Inside
from rexecd.service.interface import FileDownload, ProgressFn, TerminalProcess
from rexecd.service.lifecycle import Lifecycle
from rexecd.service.limits import CgroupPolicy
from rexecd.service.operations import ContainerOps
from rexecd.service.optional import ContainerNetwork, Forwarder, NullForwarder, NullNetwork
from rexecd.service.portforwards import PortForwards
from rexecd.service.progress import Background
from rexecd.service.publisher import Publisher
from rexecd.service.reconcile import Reconciler
from rexecd.service.records import Records
from rexecd.service.registry import Puller
from rexecd.service.roles import RoleBuilds
from rexecd.service.states import State
from rexecd.service.store import Store
from rexecd.service.storethread import in_store_thread
from rexecd.service.tenantthreads import TenantThreads
from rexecd.service.terminals import TerminalRegistry, TerminalSession
from rexecd.service.volumes import KeptVolumes
from rexecd.service.watch import Watcher


class ContainerManager:
    """The real ``ContainerService``: wiring, then one line per public method."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        runtime: Runtime,
        images: ImageStore,
        events: EventBus | None = None,
        network: ContainerNetwork | None = None,
        storage: Storage | None = None,
        *,
        forwarder: Forwarder | None = None,
        no_cgroups_reason: str = "",
    ) -> None:
        # The only place that asks whether an optional feature is there: the parts
        # get a null object instead (``optional``, ``homes``).
        self.cfg, self.store, self.runtime = cfg, store, runtime
        net = network if network is not None else NullNetwork()
        self.homes = homes_for(cfg, store, runtime, storage)
        self.volumes = KeptVolumes(cfg, store, self.homes)
        self.port_forwards = PortForwards(cfg, store, forwarder or NullForwarder())
        self.bg = Background()
        self.records = Records(store)
        self.publisher = Publisher(cfg, store, events or EventBus(), self.bg)
        self.policy = CgroupPolicy(cfg, store, runtime, self.homes, no_cgroups_reason)
        self.host = HostSide(cfg, store, runtime, net, self.homes, self.port_forwards)
        self.logs = ContainerLogs(cfg.state_dir, cfg.logs.max_bytes)
        self.terminals = TerminalRegistry(
            cfg.terminal.scrollback_bytes,
            float(cfg.terminal.idle_timeout_s),
            cfg.terminal.max_sessions,
        )
        # Exec and terminal processes are awaited on the loop, never in a worker thread.
        self.exits = ProcessExits(runtime)
        self.threads = TenantThreads()
        self.cpu = CpuMeter()
        self.watcher = Watcher(
            runtime,
            self.records,
            self.publisher,
            self.host,
            self.logs,
            InitGuard(store),
            self.bg,
            forget_run=(self.cpu.forget, self.threads.close),
        )
        self.lifecycle = Lifecycle(
            cfg, store, runtime, images, net, self.host, self.policy, self.records,
            self.publisher, self.watcher, self.logs, self.terminals,
        )  # fmt: skip
        self.puller = Puller(cfg.registries, images)
        self.imageops = ImageOps(cfg, images, self.puller, self.publisher)
        self.role_builds = RoleBuilds(
            cfg, runtime, images, self.records, self.publisher, self.lifecycle, self.homes,
            self.policy, self.exits,
        )  # fmt: skip
        self.ops = ContainerOps(
            cfg, store, runtime, images, self.records, self.publisher, self.policy,
            self.lifecycle, self.host, self.homes, self.imageops, self.role_builds, self.volumes,
            self.port_forwards, self.threads, self.logs,
        )  # fmt: skip
        self.inside = Inside(
            cfg, runtime, self.records, self.exits, self.logs, self.terminals, self.homes,
            self.threads, self.cpu,
        )  # fmt: skip
        self.reconciler = Reconciler(
            cfg, store, runtime, images, net, self.homes, self.host, self.records,
            self.publisher, self.watcher, self.lifecycle, self.port_forwards, self.volumes,
            self.bg,
        )  # fmt: skip

    # ------------------------------------------------------------ daemon

    def limits_missing(self) -> str | None:
        return self.policy.missing()

    def degraded(self) -> str | None:
        return self.policy.degraded()

    async def start_up(self) -> None:
        await self.reconciler.start_up()

    def housekeeping(self, now: datetime) -> dict[str, int]:
        return self.reconciler.housekeeping(now)

    async def expire_sessions(self, now: datetime) -> list[str]:
        return await self.reconciler.expire_sessions(now)

    async def shut_down(self) -> None:
        """Stop watching; running containers are left alone for the next daemon."""
        self.reconciler.closing = True
        for task in list(self.ops.creating.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 30)
        self.watcher.unwatch_all()
        await self.terminals.close_all()
        await self.puller.close()
        self.bg.cancel_all()
        self.threads.close_all()
        self.publisher.close()

    def log_path(self, cid: str) -> Path:
        return self.role_builds.log_path(cid)

    # ------------------------------------------------------------ queries and events

    async def list_containers(self, p: Principal) -> list[ContainerOut]:
        recs = await in_store_thread(self.store.list_containers, p.user_id)
        now = utcnow()
        return [r.to_out(now) for r in recs]

    def container_limit(self, p: Principal) -> int:
        return quotas.container_limit(self.cfg, p.tier)

    async def get_container(self, p: Principal, ref: str) -> ContainerOut:
        return (await self.records.find(p, ref)).to_out()

    async def health(self) -> Health:
        counts = await in_store_thread(self.store.container_counts)
        drv = self.runtime.cgroups
        degraded = self.degraded()
        return Health(
            status="ok" if degraded is None else "degraded",
            containers_total=sum(counts.values()),
            containers_running=counts.get(State.RUNNING, 0),
            cgroup=f"v{drv.version}" if drv is not None else "none",
            version=__version__,
            reason=degraded,
        )

    def subscribe(self, p: Principal) -> AsyncIterator[Event]:
        return self.publisher.subscribe(p.user_id)

    # ------------------------------------------------------------ container operations

    async def create_container(
        self, p: Principal, req: ContainerCreate, progress: ProgressFn | None = None
    ) -> ContainerOut:
        return await self.ops.create_container(p, req, progress)

    async def wait_ready(self, p: Principal, ref: str, timeout: float) -> ContainerOut:
        return await self.ops.wait_ready(p, ref, timeout)

    async def start_container(self, p: Principal, ref: str) -> ContainerOut:
        return await self.ops.start_container(p, ref)

    async def stop_container(self, p: Principal, ref: str, timeout: float | None) -> ContainerOut:
        return await self.ops.stop_container(p, ref, timeout)

    async def restart_container(self, p: Principal, ref: str) -> ContainerOut:
        return await self.ops.restart_container(p, ref)

    async def delete_container(self, p: Principal, ref: str, volumes: bool) -> ContainerOut:
        return await self.ops.delete_container(p, ref, volumes)

    async def update_settings(
        self, p: Principal, ref: str, patch: SettingsPatch
    ) -> tuple[ContainerOut, bool]:
        return await self.ops.update_settings(p, ref, patch)

    async def add_port_forward(
        self, p: Principal, ref: str, req: PortForwardCreate
    ) -> PortForwardOut:
        return await self.ops.add_port_forward(p, ref, req)

    async def list_port_forwards(self, p: Principal, ref: str) -> list[PortForwardOut]:
        return await self.ops.list_port_forwards(p, ref)

    async def delete_port_forward(self, p: Principal, ref: str, forward_id: str) -> PortForwardOut:
        return await self.ops.delete_port_forward(p, ref, forward_id)

    async def list_volumes(self, p: Principal) -> VolumeList:
        return await asyncio.to_thread(self.volumes.listing, p.user_id, p.tier)

    async def delete_volume(self, p: Principal, name: str) -> None:
        await asyncio.to_thread(self.volumes.remove, p.user_id, name)

    # ------------------------------------------------------------ inside a container

    async def exec(self, p: Principal, ref: str, req: ExecRequest) -> tuple[int, dict[str, object]]:
        return await self.inside.exec(p, ref, req)

    async def open_exec_stream(self, p: Principal, ref: str, req: ExecStreamStart) -> StreamProcess:
        return await self.inside.open_exec_stream(p, ref, req)

    async def open_logs(self, p: Principal, ref: str, follow: bool) -> AsyncIterator[bytes]:
        return await self.inside.open_logs(p, ref, follow)

    async def stats(self, p: Principal, ref: str) -> Stats:
        return await self.inside.stats(p, ref)

    async def list_files(self, p: Principal, ref: str, path: str) -> FileList:
        return await self.inside.list_files(p, ref, path)

    async def open_file(self, p: Principal, ref: str, path: str) -> FileDownload:
        return await self.inside.open_file(p, ref, path)

    async def upload_file(
        self,
        p: Principal,
        ref: str,
        directory: str,
        filename: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
    ) -> FileInfo:
        return await self.inside.upload_file(p, ref, directory, filename, chunks, max_bytes)

    async def delete_file(self, p: Principal, ref: str, path: str) -> None:
        await self.inside.delete_file(p, ref, path)

    async def make_dir(self, p: Principal, ref: str, path: str) -> FileInfo:
        return await self.inside.make_dir(p, ref, path)

    async def open_terminal(self, p: Principal, ref: str, cols: int, rows: int) -> TerminalProcess:
        return await self.inside.open_terminal(p, ref, cols, rows)

    async def terminal_session(
        self, p: Principal, ref: str, session_id: str, new: bool, cols: int, rows: int
    ) -> tuple[TerminalSession, bool]:
        return await self.inside.terminal_session(p, ref, session_id, new, cols, rows)

    # ------------------------------------------------------------ images and roles

    async def list_images(self) -> list[ImageInfo]:
        return await self.imageops.list_images()

    def roles(self) -> list[Role]:
        return self.imageops.roles()

    async def import_image(
        self, src: BinaryIO, name: str | None, rootfs: bool = False
    ) -> ImportResult:
        return await self.imageops.import_image(src, name, rootfs)

    async def pull_image(self, reference: str, name: str | None) -> PullOut:
        return await self.imageops.pull_image(reference, name)

    async def list_local_images(self) -> list[LocalImage]:
        return await self.imageops.list_local_images()

    async def remove_image(self, ref: str) -> ImageRemoved:
        return await self.imageops.remove_image(ref)

    async def prune_images(self, all_unused: bool) -> PruneOut:
        return await self.imageops.prune_images(all_unused)
