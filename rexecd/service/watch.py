"""The manager's watcher: each running container's init is watched through a pidfd
(its exit is recorded and its host side released), kept running by the init guard,
and its OOM kills are published."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rexecd import logs
from rexecd.models import ContainerRecord
from rexecd.runtime.container import Runtime
from rexecd.service import states
from rexecd.service.containerlogs import ContainerLogs
from rexecd.service.hostside import HostSide
from rexecd.service.initguard import InitGuard
from rexecd.service.progress import Background
from rexecd.service.publisher import Publisher
from rexecd.service.records import Records
from rexecd.service.states import State

log = logging.getLogger(__name__)
OOM_RECHECK_S = (0.05, 0.2, 0.5, 1.0)


@dataclass
class InitWatch:
    """A running container's init as the daemon watches it: its pidfd, and the future
    its exit status (None when another process is its parent) is set on."""

    pid: int
    pidfd: int
    exited: asyncio.Future[int | None]


class Watcher:
    def __init__(
        self,
        runtime: Runtime,
        records: Records,
        publisher: Publisher,
        host: HostSide,
        logs: ContainerLogs,
        guard: InitGuard,
        bg: Background,
        forget_run: Sequence[Callable[[str], None]] = (),
    ) -> None:
        self.runtime, self.records, self.publisher, self.host = runtime, records, publisher, host
        self.logs, self.guard, self.bg = logs, guard, bg
        # What else holds per-run state of a container (by db id): dropped on unwatch.
        self._forget_run = forget_run
        self.inits: dict[str, InitWatch] = {}
        self.oom_fds: dict[str, int] = {}
        self.oom_seen: dict[str, int] = {}
        self._log_ids: dict[str, str] = {}
        self._guarding = False

    def watch(self, rec: ContainerRecord) -> None:
        """Notice when init exits (pidfd: works for adopted containers too), when it is
        stopped (the init guard continues it) and OOM kills."""
        assert rec.pid is not None
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            self.bg.spawn(self.on_exit(rec.db_id, rec.pid, None))
            return
        watch = InitWatch(rec.pid, pidfd, loop.create_future())
        self.inits[rec.db_id] = watch
        self._log_ids[rec.db_id] = rec.id
        self.logs.watch(rec.id, rec.pid)
        loop.add_reader(pidfd, self._init_exited, rec.db_id, watch)
        self.guard.watch(rec.db_id, rec.pid, pidfd, rec.name, rec.user_id)
        if not self._guarding:
            self._guarding = True
            self.bg.spawn(self.guard.run())
        cg = self.runtime.cgroup(rec.id)
        if cg is not None:
            fd = cg.oom_fd()
            if fd is not None:
                self.oom_fds[rec.db_id] = fd
                self.oom_seen[rec.db_id] = cg.stats().oom_kills
                loop.add_reader(fd, lambda: self._on_oom(rec.db_id, rec.id, fd))

    def _init_exited(self, db_id: str, watch: InitWatch) -> None:
        # A pidfd stays readable once its process has exited: one wake-up is enough.
        asyncio.get_running_loop().remove_reader(watch.pidfd)
        self.bg.spawn(self._collect_exit(db_id, watch))

    async def _collect_exit(self, db_id: str, watch: InitWatch) -> None:
        """Collect the status of an init that exited (reaping it if the daemon is its
        parent), wake a stop waiting for it, and record the exit if nobody stopped it."""
        # A duplicate: unwatch may close the watch's own fd while the thread uses it.
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
        await self.on_exit(db_id, watch.pid, status)

    def unwatch(self, db_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.guard.forget(db_id)  # before its pidfd closes
        cid = self._log_ids.pop(db_id, None)
        if cid is not None:
            self.logs.unwatch(cid)
        watch = self.inits.pop(db_id, None)
        if watch is not None:
            loop.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.exited.cancel()
        fd = self.oom_fds.pop(db_id, None)
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)
        # Per run: the next start has a new cgroup with counters from zero.
        self.oom_seen.pop(db_id, None)
        for forget in self._forget_run:
            forget(db_id)

    def unwatch_all(self) -> None:
        for db_id in list(self.inits) + list(self.oom_fds):
            self.unwatch(db_id)

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
        if db_id not in self.oom_fds:
            return False  # stopped meanwhile
        cg = self.runtime.cgroup(cid)
        if cg is None:
            return False
        kills = cg.stats().oom_kills
        if kills <= self.oom_seen.get(db_id, 0):
            return False
        self.oom_seen[db_id] = kills
        self.bg.spawn(self._publish_oom(db_id))
        return True

    async def _publish_oom(self, db_id: str) -> None:
        rec = await self.records.get(db_id)
        if rec is not None:
            self.publisher.publish("oom", rec)

    async def on_exit(self, db_id: str, pid: int, status: int | None) -> None:
        async with self.records.lock(db_id):
            rec = await self.records.get(db_id)
            if rec is None or rec.pid != pid or states.of(rec) is not State.RUNNING:
                # Already handled by stop/delete, or an exit of an older incarnation.
                if rec is None or rec.pid == pid:
                    self.unwatch(db_id)
                return
            oom = self.oom_seen.get(db_id, 0) > 0
            reason = None
            if oom and status is not None and status == 128 + 9:
                reason = "init was killed by the out-of-memory killer"
            elif status not in (None, 0):
                reason = f"container init exited with status {status}"
            self.unwatch(db_id)
            await asyncio.to_thread(self.host.release, rec)
            rec = await self.records.move(
                db_id, State.STOPPED, pid=None, pid_start_time=None, error_message=reason
            )
            self.publisher.publish(
                "stopped", rec, lifecycle="exit", detail=logs.exit_detail(status, oom)
            )
