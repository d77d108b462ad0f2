"""Container manager: reconcile at start-up, session expiry, housekeeping and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from datetime import datetime, timedelta

from rexecd.errors import (
    NotFound,
)
from rexecd.models import (
    utcnow,
)
from rexecd.runtime import procinfo
from rexecd.service import quotas
from rexecd.service.core import (
    ACTIVE,
    EXPIRY_CHECK_S,
    ManagerCore,
)

log = logging.getLogger(__name__)


class DaemonLife(ManagerCore):
    """The daemon's side of the manager: start-up reconcile, session expiry, shutdown."""

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
                await self._log_lifecycle("adopt", rec, f"pid={rec.pid}")
                continue
            if alive and rec.pid is not None:
                # Killed mid-create: what exists is half-built; take it down.
                await asyncio.to_thread(self.runtime.stop, rec.id, rec.pid, 0.0)
            if rec.status == "configuring":
                # A role install was cut short (its build has no pid on record): stop
                # what is left of it, and let none of its files reach the container.
                await asyncio.to_thread(self.runtime.kill_cgroup, rec.id)
            await asyncio.to_thread(self._release, rec)
            if rec.status == "configuring":
                await asyncio.to_thread(self._wipe_root, rec)
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
            await self._log_lifecycle("exit", rec, f"cause=reconcile ({rec.error_message})")
        await asyncio.to_thread(self._sweep_orphans, live)
        # Leases of containers that no longer exist (deleted while a crash hid it).
        await asyncio.to_thread(self.images.drop_leases, {r.id for r in recs})
        forwards = await asyncio.to_thread(self.port_forwards.reconcile, live)
        if forwards:
            log.info("reconciled port forwards: %s", forwards)
        volumes = await asyncio.to_thread(self.volumes.recover)
        if volumes:
            log.info("reconciled volume records: %s", volumes)
        self._spawn(self._expiry_loop())
        self._spawn(self._housekeeping_loop())

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

    async def _housekeeping_loop(self) -> None:
        while not self._closing:
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
        for db_id in list(self._inits) + list(self._oom_fds):
            self._unwatch(db_id)
        await self.terminals.close_all()
        await self.puller.close()
        for task in list(self._bg):
            task.cancel()
        self.events.close()
