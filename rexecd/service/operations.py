"""The manager's container operations: create (its background part included), start,
stop, restart, delete, settings and port forwards, each under the container's lock,
with the rules of who may do what in which state. The kernel work is the lifecycle
part's; this part decides when it runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from rexecd.config import Config
from rexecd.errors import Conflict, InvalidRequest, RexecError, SessionExpired
from rexecd.models import (
    ContainerCreate,
    ContainerOut,
    ContainerRecord,
    PortForwardCreate,
    PortForwardOut,
    SettingsPatch,
    utcnow,
)
from rexecd.runtime.container import Runtime
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.service import quotas, states
from rexecd.service.auth import Principal
from rexecd.service.cancel import DELETED, CancelToken
from rexecd.service.catalog import Resolved
from rexecd.service.containerlogs import ContainerLogs
from rexecd.service.homes import Homes
from rexecd.service.hostside import HostSide
from rexecd.service.imageops import ImageOps
from rexecd.service.interface import ProgressFn
from rexecd.service.lifecycle import Lifecycle
from rexecd.service.limits import CgroupPolicy
from rexecd.service.names import generate_name
from rexecd.service.portforwards import PortForwards
from rexecd.service.progress import Reporter
from rexecd.service.publisher import Publisher
from rexecd.service.records import Records
from rexecd.service.roles import RoleBuilds
from rexecd.service.states import BUILDING, State
from rexecd.service.store import Store
from rexecd.service.storethread import in_store_thread
from rexecd.service.tenantthreads import TenantThreads
from rexecd.service.volumes import KeptVolumes

log = logging.getLogger(__name__)


@dataclass
class ContainerOps:
    cfg: Config
    store: Store
    runtime: Runtime
    images: ImageStore
    records: Records
    publisher: Publisher
    policy: CgroupPolicy
    lifecycle: Lifecycle
    host: HostSide
    homes: Homes
    imageops: ImageOps
    roles: RoleBuilds
    volumes: KeptVolumes
    port_forwards: PortForwards
    threads: TenantThreads
    logs: ContainerLogs
    # Creates whose background part still runs, by db id, and the token that stops each.
    creating: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    cancels: dict[str, CancelToken] = field(default_factory=dict)

    # ------------------------------------------------------------ create

    async def create_container(
        self, p: Principal, req: ContainerCreate, progress: ProgressFn | None = None
    ) -> ContainerOut:
        self.policy.require()
        report = Reporter(progress)
        resolved, image = await asyncio.to_thread(self.imageops.resolve, req)
        if req.role is not None and req.role not in {r.id for r in self.cfg.roles}:
            raise InvalidRequest(
                f"unknown role {req.role!r}", supported_roles=[r.id for r in self.cfg.roles]
            )
        resources = quotas.resources_for_create(self.cfg, p.tier, req)
        now = utcnow()
        rec = ContainerRecord(
            user_id=p.user_id,
            name=req.name or await self._free_name(p),
            # What the user asked for, as Rexec reports it ("debian", "busybox"); the
            # lease written once the image is there pins what it resolved to.
            image=req.custom_image if req.image == "custom" and req.custom_image else req.image,
            role=req.role,
            resources=resources,
            environment=dict(req.environment),
            labels=dict(req.labels),
            network_mode=req.network_mode or self.cfg.network.mode_default,
            created_at=now,
            last_used_at=now,
            expires_at=quotas.session_expiry(self.cfg, p.tier, now),
        )
        await in_store_thread(
            self.store.insert_container_checked, rec, quotas.container_limit(self.cfg, p.tier)
        )
        # Only now: the first frame starts the SSE answer, so a refusal above (image,
        # quota, name taken) still reaches a stream client as a plain JSON error.
        await report("validating", "request validated", 5, container_id=rec.id)
        self.publisher.publish("created", rec)
        token = CancelToken()
        task = asyncio.ensure_future(self._finish_create(rec, image, resolved, report, token))
        self.creating[rec.db_id] = task
        self.cancels[rec.db_id] = token
        db_id = rec.db_id

        def forget(_t: asyncio.Task[None]) -> None:
            self.creating.pop(db_id, None)
            self.cancels.pop(db_id, None)

        task.add_done_callback(forget)
        return rec.to_out(async_=True)

    async def _free_name(self, p: Principal) -> str:
        taken = {r.name for r in await in_store_thread(self.store.list_containers, p.user_id)}
        return generate_name(taken=taken)

    async def wait_ready(self, p: Principal, ref: str, timeout: float) -> ContainerOut:
        rec = await self.records.find(p, ref)
        task = self.creating.get(rec.db_id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return (await self.records.find(p, ref)).to_out()

    async def _finish_create(
        self,
        rec: ContainerRecord,
        image: ImageRecord | None,
        resolved: Resolved,
        report: Reporter,
        token: CancelToken,
    ) -> None:
        """The create's slow part, under the container's lock. A delete cancels
        ``token``: each step then completes and is undone, or never starts (see
        service/cancel.py); what stays (image lease, volume, a started init) is the
        delete's to remove, once this has returned."""
        async with self.records.lock(rec.db_id):
            try:
                if image is None:
                    image = await self.imageops.pull_for(rec, resolved, report, token)
                else:
                    await report(
                        "pulling", f"image {image.ref} is present", 20, container_id=rec.id
                    )
                token.check()
                # From here on the container keeps this image's layers, whatever later
                # happens to its name (re-pull, re-tag, removal).
                await asyncio.to_thread(self.images.pin, rec.id, image)
                await report(
                    "creating", "preparing the container's storage", 40, container_id=rec.id
                )
                with_role = await self.roles.with_role(rec, image, report, token)
                token.check()
                if with_role is not image:
                    # The role's layer too, for as long as the container exists.
                    await asyncio.to_thread(self.images.pin, rec.id, with_role)
                rec = await self.lifecycle.launch(rec, with_role, report, token)
                token.check()  # started meanwhile: the delete halts it
            except Exception as exc:
                if token.reason is None:
                    await self._create_failed(rec, exc, report)
                    return
                # Cancelled (CreateCancelled, or the error of a step cut short): the
                # record is the delete's to remove, so no state change or event here.
                await report(
                    "starting",
                    f"create cancelled: {token.reason}",
                    100,
                    error=token.reason,
                    container_id=rec.id,
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

    async def _create_failed(self, rec: ContainerRecord, exc: Exception, report: Reporter) -> None:
        """A create that failed: recorded (state ``error``) and reported, never lost."""
        if not isinstance(exc, RexecError):
            log.error("create of %s failed", rec.id, exc_info=exc)
        message = exc.message if isinstance(exc, RexecError) else "internal error"
        rec = await self.records.move(
            rec.db_id, State.ERROR, error_message=message, pid=None, pid_start_time=None
        )
        self.publisher.publish("updated", rec)
        await report(
            "starting",
            f"create failed: {message}",
            100,
            error=message,
            container_id=rec.id,
            container=rec.to_out(),
        )

    # ------------------------------------------------------------ lifecycle

    async def start_container(self, p: Principal, ref: str) -> ContainerOut:
        rec = await self.records.find(p, ref)
        async with self.records.lock(rec.db_id):
            rec = await self.records.find(p, ref)
            if states.of(rec) is State.RUNNING:
                raise Conflict("container is already running", status=rec.status)
            if states.of(rec) in BUILDING:
                raise Conflict("container is still being created", status=rec.status)
            self.policy.require()  # before the expiry below is renewed
            if states.of(rec) is State.EXPIRED:
                exp = quotas.session_expiry(self.cfg, p.tier, rec.created_at)
                if exp is not None and exp <= utcnow():
                    raise SessionExpired(
                        "container session expired: delete it or upgrade the tier",
                        tier=p.tier,
                    )
                rec = await self.records.update(rec.db_id, expires_at=exp)
            image = await asyncio.to_thread(self.imageops.image_of, rec)
            rec = await self.lifecycle.launch(rec, image)
        return rec.to_out()

    async def stop_container(self, p: Principal, ref: str, timeout: float | None) -> ContainerOut:
        rec = await self.records.find(p, ref)
        async with self.records.lock(rec.db_id):
            rec = await self.records.find(p, ref)
            if states.of(rec) is not State.RUNNING:
                raise Conflict("container is not running", status=rec.status)
            rec = await self.lifecycle.halt(rec, self._timeout(timeout))
        return rec.to_out()

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return float(self.cfg.stop_timeout_s)
        if timeout < 0:
            raise InvalidRequest("timeout must not be negative")
        return min(float(timeout), 300.0)

    async def restart_container(self, p: Principal, ref: str) -> ContainerOut:
        rec = await self.records.find(p, ref)
        async with self.records.lock(rec.db_id):
            rec = await self.records.find(p, ref)
            if states.of(rec) in BUILDING:
                raise Conflict("container is still being created", status=rec.status)
            if states.of(rec) is State.EXPIRED:
                raise SessionExpired(
                    "container session expired: delete it or upgrade the tier",
                    tier=p.tier,
                )
            # Before the halt: a restart that cannot start again must not stop it.
            self.policy.require()
            if states.of(rec) is State.RUNNING:
                rec = await self.lifecycle.halt(rec, float(self.cfg.stop_timeout_s))
            image = await asyncio.to_thread(self.imageops.image_of, rec)
            rec = await self.lifecycle.launch(rec, image)
        return rec.to_out()

    async def delete_container(self, p: Principal, ref: str, volumes: bool) -> ContainerOut:
        rec = await self.records.find(p, ref)
        task = self.creating.get(rec.db_id)
        if task is not None:
            # The create stops at its next step boundary, its long steps cut short,
            # and undoes what it made; the rest (record, lease, volume) goes below.
            token = self.cancels.get(rec.db_id)
            if token is not None:
                token.cancel(DELETED)
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        async with self.records.lock(rec.db_id):
            rec = await self.records.find(p, ref)
            if states.of(rec) is State.RUNNING:
                rec = await self.lifecycle.halt(rec, float(self.cfg.stop_timeout_s))
            await asyncio.to_thread(self._remove, rec, volumes, p.tier)
            self.records.forget(rec.db_id)
            self.threads.close(rec.db_id)
        self.publisher.publish("deleted", rec)
        return rec.to_out()

    def _remove(self, rec: ContainerRecord, volumes: bool, tier: str) -> None:
        self.host.release(rec)
        self.runtime.remove(rec.id)
        self.images.unpin(rec.id)
        self.roles.log_path(rec.id).unlink(missing_ok=True)
        if volumes:
            self.volumes.destroy(rec.user_id, rec.name)
            self.store.delete_volume(rec.user_id, rec.name)
        else:
            # The container's root goes; /home/user stays for the same name.
            self.homes.drop_root(rec)
        self.store.delete_container(rec.db_id)
        self.logs.remove(rec.id)
        if not volumes:
            # Kept now: within the tier's cap, or the least recently used kept go.
            removed = self.volumes.keep(rec.user_id, tier, rec.name, rec.resources.disk_mb)
            if removed:
                log.info("kept-volume cap of user %s: removed %s", rec.user_id, removed)

    async def update_settings(
        self, p: Principal, ref: str, patch: SettingsPatch
    ) -> tuple[ContainerOut, bool]:
        """cpu and memory change live; the disk grows online where the storage can (else
        at the next start); a rename of a running container with quota'd storage restarts
        it, since its volume is mounted under its name."""
        rec = await self.records.find(p, ref)
        restarted = False
        async with self.records.lock(rec.db_id):
            rec = await self.records.find(p, ref)
            res = quotas.resources_for_update(self.cfg, p.tier, rec.resources, patch)
            if not self.homes.can_shrink and res.disk_mb < rec.resources.disk_mb:
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
                taken = await in_store_thread(self.store.find_container, p.user_id, patch.name)
                if taken is not None and taken.name == patch.name:
                    raise Conflict("container with this name already exists", name=patch.name)
                if await asyncio.to_thread(self.homes.exists, p.user_id, patch.name):
                    raise Conflict(
                        "a kept /home/user volume already has this name", name=patch.name
                    )
            restart = renaming and states.of(rec) is State.RUNNING and self.homes.renames_restart
            if restart:
                self.policy.require()
                rec = await self.lifecycle.halt(rec, float(self.cfg.stop_timeout_s))
            elif states.of(rec) is State.RUNNING:
                cg = self.runtime.cgroup(rec.id)
                if cg is not None:
                    # The whole policy, io included: apply() lifts whatever it is not given.
                    limits = await asyncio.to_thread(self.policy.limits, rec, res)
                    await asyncio.to_thread(cg.apply, limits)
                if res.disk_mb > old.resources.disk_mb:
                    await asyncio.to_thread(self.homes.grow, rec, res.disk_mb)
            rec = await self.records.update(rec.db_id, **fields)
            if renaming:
                # The volume is found by (user, name): it follows the container's name,
                # or the next start would mount an empty /home/user.
                await asyncio.to_thread(self._move_volume, old, rec)
            if restart:
                image = await asyncio.to_thread(self.imageops.image_of, rec)
                rec = await self.lifecycle.launch(rec, image)
                restarted = True
            self.publisher.publish("updated", rec)
        return rec.to_out(), restarted

    # ------------------------------------------------------------ port forwards

    async def add_port_forward(
        self, p: Principal, ref: str, req: PortForwardCreate
    ) -> PortForwardOut:
        rec = await self.records.find(p, ref)
        # Under the container's lock: a stop between the running check and the nft
        # element would leave a forward to an address the container no longer has.
        async with self.records.lock(rec.db_id):
            rec = await self.records.find(p, ref)
            return await asyncio.to_thread(self.port_forwards.add, rec, p.tier, req)

    async def list_port_forwards(self, p: Principal, ref: str) -> list[PortForwardOut]:
        rec = await self.records.find(p, ref)
        return await asyncio.to_thread(self.port_forwards.for_container, rec)

    async def delete_port_forward(self, p: Principal, ref: str, forward_id: str) -> PortForwardOut:
        rec = await self.records.find(p, ref)
        async with self.records.lock(rec.db_id):
            return await asyncio.to_thread(self.port_forwards.remove, rec, forward_id)

    def _move_volume(self, old: ContainerRecord, new: ContainerRecord) -> None:
        dst = self.homes.move(old, new)
        if dst is None:
            return
        self.store.delete_volume(old.user_id, old.name)
        self.store.upsert_volume(new.user_id, new.name, str(dst), new.resources.disk_mb)
