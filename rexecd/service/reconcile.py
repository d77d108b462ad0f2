"""The manager's reconciler part: records and host brought in step at start-up, then
session expiry and housekeeping on timers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta

from rexecd.config import Config
from rexecd.errors import NotFound
from rexecd.models import ContainerRecord, utcnow
from rexecd.runtime import procinfo
from rexecd.runtime.container import Runtime
from rexecd.runtime.images import ImageStore
from rexecd.service import quotas, states
from rexecd.service.homes import Homes
from rexecd.service.hostside import HostSide
from rexecd.service.lifecycle import Lifecycle
from rexecd.service.optional import ContainerNetwork
from rexecd.service.portforwards import PortForwards
from rexecd.service.progress import Background
from rexecd.service.publisher import Publisher
from rexecd.service.records import Records
from rexecd.service.states import ACTIVE, State
from rexecd.service.store import Store
from rexecd.service.volumes import KeptVolumes
from rexecd.service.watch import Watcher

log = logging.getLogger(__name__)


EXPIRY_CHECK_S = 10.0


@dataclass
class Reconciler:
    cfg: Config
    store: Store
    runtime: Runtime
    images: ImageStore
    network: ContainerNetwork
    homes: Homes
    host: HostSide
    records: Records
    publisher: Publisher
    watcher: Watcher
    lifecycle: Lifecycle
    port_forwards: PortForwards
    volumes: KeptVolumes
    bg: Background
    closing: bool = False

    async def start_up(self) -> None:
        """Reconcile the records with the host after a (re)start, then start the timers."""
        await asyncio.to_thread(self._prepare_host)
        recs = await asyncio.to_thread(self.store.list_containers)
        live: set[str] = set()
        for rec in recs:
            if states.of(rec) not in ACTIVE:
                continue
            alive = rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time)
            if alive and states.of(rec) is State.RUNNING:
                live.add(rec.id)
                self.watcher.watch(rec)
                await self.publisher.log_lifecycle("adopt", rec, f"pid={rec.pid}")
                continue
            rec = await self._take_down(rec, alive)
            await self.publisher.log_lifecycle(
                "exit", rec, f"cause=reconcile ({rec.error_message})"
            )
        await asyncio.to_thread(self._sweep_orphans, live)
        # Leases of containers that no longer exist (deleted while a crash hid it).
        await asyncio.to_thread(self.images.drop_leases, {r.id for r in recs})
        forwards = await asyncio.to_thread(self.port_forwards.reconcile, live)
        if forwards:
            log.info("reconciled port forwards: %s", forwards)
        volumes = await asyncio.to_thread(self.volumes.recover)
        if volumes:
            log.info("reconciled volume records: %s", volumes)
        self.bg.spawn(self._expiry_loop())
        self.bg.spawn(self._housekeeping_loop())

    async def _take_down(self, rec: ContainerRecord, alive: bool) -> ContainerRecord:
        """What is left of an active container whose init is gone (or half-built)."""
        if alive and rec.pid is not None:
            # Killed mid-create: what exists is half-built; take it down.
            await asyncio.to_thread(self.runtime.stop, rec.id, rec.pid, 0.0)
        if states.of(rec) is State.CONFIGURING:
            # A role install was cut short (its build has no pid on record): stop
            # what is left of it, and let none of its files reach the container.
            await asyncio.to_thread(self.runtime.kill_cgroup, rec.id)
        await asyncio.to_thread(self.host.release, rec)
        if states.of(rec) is State.CONFIGURING:
            await asyncio.to_thread(self.homes.wipe_root, rec)
        if states.of(rec) is State.RUNNING:
            return await self.records.move(
                rec.db_id,
                State.STOPPED,
                pid=None,
                pid_start_time=None,
                error_message="container stopped while the daemon was down",
            )
        await asyncio.to_thread(self.store.release_ips, rec.db_id)
        return await self.records.move(
            rec.db_id,
            State.ERROR,
            pid=None,
            pid_start_time=None,
            error_message="the daemon restarted during creation",
        )

    def _prepare_host(self) -> None:
        if self.runtime.cgroups is not None:
            self.runtime.cgroups.prepare()
        self.network.setup_host()

    def _sweep_orphans(self, live: set[str]) -> None:
        """Kernel objects of containers the records do not know as running go away."""
        if self.runtime.cgroups is not None:
            for name in self.runtime.cgroups.list():
                if name not in live:
                    log.info("removing orphaned cgroup %s", name)
                    with contextlib.suppress(NotFound):
                        self.runtime.cgroups.open(name).destroy()
        keep = {(r.user_id, r.name) for r in self.store.list_containers() if r.id in live}
        released = self.homes.reconcile(keep)
        if released:
            log.info("released volumes of containers that are not running: %s", released)
        run_containers = self.runtime.run_dir / "containers"
        for d in run_containers.iterdir() if run_containers.exists() else []:
            if d.name not in live:
                shutil.rmtree(d, ignore_errors=True)
        removed = self.network.reconcile(live)
        if removed:
            log.info("removed orphaned network objects: %s", removed)

    async def _expiry_loop(self) -> None:
        while not self.closing:
            try:
                await self.expire_sessions(utcnow())
            except Exception:  # the loop must survive one bad pass
                log.exception("session expiry pass failed")
            await asyncio.sleep(EXPIRY_CHECK_S)

    async def _housekeeping_loop(self) -> None:
        while not self.closing:
            try:
                await asyncio.to_thread(self.housekeeping, utcnow())
            except Exception:  # the loop must survive one bad pass
                log.exception("housekeeping pass failed")
            await asyncio.sleep(self.cfg.retention.sweep_interval_s)

    def housekeeping(self, now: datetime) -> dict[str, int]:
        """Apply ``retention`` once: trim the event log, drop dead token rows, expire
        and cap kept volumes. Returns how many of each went. Blocking: run in a thread."""
        r = self.cfg.retention
        done = {
            "events": self.store.prune_events(
                r.events_max_rows, before=now - timedelta(days=r.events_max_days)
            ),
            "tokens": self.store.prune_tokens(now - timedelta(days=r.expired_token_days)),
            "volumes_expired": len(self.volumes.expire(now)),
            "volumes_over_cap": len(self.volumes.enforce_caps()),
        }
        if any(done.values()):
            log.info("housekeeping: removed %s", done)
        return done

    async def expire_sessions(self, now: datetime) -> list[str]:
        """Stop (data kept) every running container whose session time is over."""
        expired = []
        for rec in await asyncio.to_thread(self.store.list_containers):
            if states.of(rec) is not State.RUNNING or not quotas.is_expired(rec.expires_at, now):
                continue
            async with self.records.lock(rec.db_id):
                cur = await self.records.get(rec.db_id)
                if cur is None or states.of(cur) is not State.RUNNING:
                    continue
                await self.lifecycle.halt(
                    cur,
                    float(self.cfg.stop_timeout_s),
                    status=State.EXPIRED,
                    reason="session time is over",
                )
                expired.append(cur.id)
        return expired
