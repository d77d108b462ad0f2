"""The manager's inside part: work inside a running container (exec, stats, files,
terminals). Reads of what the tenant controls (its /etc/passwd, its shell, its tree's
size) run on the container's own thread (``tenantthreads``), never the shared pool."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rexecd.config import Config
from rexecd.errors import (
    ChildSetupError,
    ContainerNotFound,
    ContainerNotRunning,
    PayloadTooLarge,
)
from rexecd.models import (
    ContainerRecord,
    ExecRequest,
    ExecStreamStart,
    FileInfo,
    FileList,
    Stats,
    utcnow,
)
from rexecd.runtime import containerroot, procinfo
from rexecd.runtime.container import Runtime, merge_env
from rexecd.runtime.containerfs import ContainerFS, Entry, mode_string
from rexecd.runtime.pty import set_size
from rexecd.runtime.seccomp import DEFAULT as DEFAULT_SECCOMP
from rexecd.runtime.spec import ProcessSpec
from rexecd.service import quotas, states
from rexecd.service.auth import Principal
from rexecd.service.containerlogs import ContainerLogs
from rexecd.service.execstream import STDERR, STDOUT, StreamProcess, failed_stream
from rexecd.service.execution import run_exec, setup_failure
from rexecd.service.exits import ProcessExits
from rexecd.service.homes import Homes
from rexecd.service.hostside import HOME
from rexecd.service.interface import FileDownload, TerminalProcess
from rexecd.service.records import Records
from rexecd.service.states import ACTIVE, State
from rexecd.service.tenantthreads import TenantThreads
from rexecd.service.terminals import TerminalRegistry, TerminalSession

log = logging.getLogger(__name__)


def _seccomp(rec: ContainerRecord) -> str:
    """The seccomp profile ``rec`` started with (containers started before profiles
    were recorded run the default one)."""
    return str(rec.spec.get("seccomp", DEFAULT_SECCOMP))


MiB = 1024 * 1024


def _file_info(e: Entry) -> FileInfo:
    return FileInfo(
        name=e.name,
        path=e.path,
        size=e.size,
        mode=mode_string(e.mode),
        mod_time=e.mtime,
        is_dir=e.is_dir,
    )


class CpuMeter:
    """The last cpu usage sample of each running container, for ``cpu_percent``."""

    def __init__(self) -> None:
        self.prev: dict[str, tuple[float, int]] = {}

    def percent(self, db_id: str, usage_usec: int) -> float:
        now = time.monotonic()
        prev = self.prev.get(db_id)
        self.prev[db_id] = (now, usage_usec)
        if prev is None or now <= prev[0]:
            return 0.0
        return max(0.0, (usage_usec - prev[1]) / ((now - prev[0]) * 1e6) * 100.0)

    def forget(self, db_id: str) -> None:
        self.prev.pop(db_id, None)


@dataclass
class Inside:
    cfg: Config
    runtime: Runtime
    records: Records
    exits: ProcessExits
    logs: ContainerLogs
    terminals: TerminalRegistry
    homes: Homes
    threads: TenantThreads
    cpu: CpuMeter

    async def _running(self, p: Principal, ref: str) -> ContainerRecord:
        rec = await self.records.find(p, ref)
        if states.of(rec) is not State.RUNNING or rec.pid is None:
            raise ContainerNotRunning("container is not running", status=rec.status)
        return rec

    async def _touch(self, rec: ContainerRecord) -> None:
        await self.records.update(rec.db_id, last_used_at=utcnow())

    async def _ids(self, rec: ContainerRecord, user: str | None) -> tuple[int, int, list[int]]:
        if user is None:
            return int(rec.spec.get("uid", 0)), int(rec.spec.get("gid", 0)), []
        assert rec.pid is not None
        # The container's /etc/passwd and /etc/group: its tenant's files.
        ident = await self.threads.run(rec.db_id, containerroot.identity, rec.pid, user)
        if rec.spec.get("userns_base"):
            ident.require_mapped(self.cfg.userns.size)
        return ident.uid, ident.gid, ident.additional_gids

    async def _exec_spec(self, rec: ContainerRecord, req: ExecRequest, tty: bool) -> ProcessSpec:
        uid, gid, groups = await self._ids(rec, req.user)
        env = list(rec.spec.get("env", [])) + list(req.env)
        if tty and not any(e.startswith("TERM=") for e in req.env):
            env.append("TERM=xterm-256color")
        return ProcessSpec(
            args=req.argv(),
            env=merge_env([], env),
            cwd=req.workdir or HOME,
            uid=uid,
            gid=gid,
            additional_gids=groups,
            tty=tty,
        )

    async def exec(self, p: Principal, ref: str, req: ExecRequest) -> tuple[int, dict[str, object]]:
        rec = await self._running(p, ref)
        assert rec.pid is not None
        proc = await self._exec_spec(rec, req, tty=False)
        await self._touch(rec)
        try:
            code, result = await run_exec(
                self.runtime,
                self.exits,
                rec.id,
                rec.pid,
                proc,
                float(quotas.exec_timeout(self.cfg, req.timeout_seconds)),
                self.cfg.exec.output_cap_bytes,
                seccomp=_seccomp(rec),
            )
        except ChildSetupError:
            # Exec takes no lock (it may run for minutes): a stop or delete that won the
            # race is the caller's 409/404, not a server fault.
            await self._gone_while_entering(rec)
            raise
        return code, result.model_dump(mode="json")

    async def open_exec_stream(self, p: Principal, ref: str, req: ExecStreamStart) -> StreamProcess:
        """Start ``req`` with its stdio (or a PTY) handed back to the caller to stream;
        a program that cannot be started is a process that printed why and exited
        126/127, as with the one-shot exec."""
        rec = await self._running(p, ref)
        assert rec.pid is not None
        proc = await self._exec_spec(rec, req, tty=req.tty)
        await self._touch(rec)
        timeout = float(min(req.timeout_seconds, self.cfg.exec.max_timeout_s)) or None
        if req.tty:
            mine: list[int] = []
            theirs: list[int] = []
        else:
            # The child's ends block (a program may not expect otherwise); ours are
            # made non-blocking by the stream.
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            mine, theirs = [in_w, out_r, err_r], [in_r, out_w, err_w]
        try:
            try:
                child, master = await asyncio.to_thread(
                    self.runtime.exec, rec.id, rec.pid, proc, theirs or None
                )
            finally:
                for fd in theirs:
                    os.close(fd)
        except ChildSetupError as exc:
            for fd in mine:
                os.close(fd)
            try:
                code, msg = setup_failure(exc, proc)
            except ChildSetupError:
                await self._gone_while_entering(rec)
                raise
            return failed_stream(self.exits, code, msg)
        except BaseException:
            for fd in mine:
                os.close(fd)
            raise
        if master is not None:
            set_size(master, req.cols, req.rows)
            return StreamProcess(
                child.pid, True, master, [(STDOUT, master)], self.exits, timeout=timeout
            )
        in_w, out_r, err_r = mine
        return StreamProcess(
            child.pid, False, in_w, [(STDOUT, out_r), (STDERR, err_r)], self.exits, timeout=timeout
        )

    async def open_logs(self, p: Principal, ref: str, follow: bool) -> AsyncIterator[bytes]:
        rec = await self.records.find(p, ref)

        async def alive() -> bool:
            now = await self.records.get(rec.db_id)
            return now is not None and states.of(now) in ACTIVE

        return self.logs.follow(rec.id, follow, alive)

    async def _gone_while_entering(self, rec: ContainerRecord) -> None:
        """Raise NotFound/Conflict if ``rec`` was deleted or stopped under a request."""
        async with self.records.lock(rec.db_id):  # a stop under way finishes first
            now = await self.records.get(rec.db_id)
        if now is None:
            raise ContainerNotFound("container not found")
        alive = rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time)
        if states.of(now) is not State.RUNNING or now.pid != rec.pid or not alive:
            raise ContainerNotRunning("container is not running", status=now.status)

    async def stats(self, p: Principal, ref: str) -> Stats:
        rec = await self.records.find(p, ref)
        # Sizes the tenant's tree (without a volume of its own): on its thread.
        return await self.threads.run(rec.db_id, self._stats, rec)

    def _stats(self, rec: ContainerRecord) -> Stats:
        res = rec.resources
        disk_used, disk_limit = self.homes.space(rec)
        cg = self.runtime.cgroup(rec.id) if states.of(rec) is State.RUNNING else None
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
                disk_limit=disk_limit,
                net_rx=0,
                net_tx=0,
                oom_kills=0,
            )
        s = cg.stats()
        pct = self.cpu.percent(rec.db_id, s.cpu_usage_usec)
        rx, tx = containerroot.net_counters(rec.pid) if rec.pid else (0, 0)
        return Stats(
            cpu_percent=round(pct, 2),
            cpu_usage_usec=s.cpu_usage_usec,
            memory=s.memory,
            memory_limit=s.memory_limit or res.memory_mb * MiB,
            pids=s.pids,
            disk_read=s.io_read_bytes,
            disk_write=s.io_write_bytes,
            disk_usage=disk_used,
            disk_limit=disk_limit,
            net_rx=rx,
            net_tx=tx,
            oom_kills=s.oom_kills,
        )

    def _fs(self, rec: ContainerRecord) -> ContainerFS:
        """The container's files, written with its user's host ids: in its user
        namespace's range (``userns_base``) when it has one."""
        assert rec.pid is not None
        uid, gid = int(rec.spec.get("uid", 0)), int(rec.spec.get("gid", 0))
        return containerroot.files(rec.pid, int(rec.spec.get("userns_base", 0)), uid, gid)

    async def list_files(self, p: Principal, ref: str, path: str) -> FileList:
        rec = await self._running(p, ref)

        def work() -> FileList:
            with self._fs(rec) as fs:
                entries = fs.list(path)
            return FileList(path=path, files=[_file_info(e) for e in entries], count=len(entries))

        return await self.threads.run(rec.db_id, work)

    async def open_file(self, p: Principal, ref: str, path: str) -> FileDownload:
        rec = await self._running(p, ref)

        def work() -> FileDownload:
            with self._fs(rec) as fs:
                entry, f = fs.open_read(path)
            return FileDownload(info=_file_info(entry), fileobj=f)

        return await self.threads.run(rec.db_id, work)

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
        fs = self._fs(rec)
        try:
            up = await self.threads.run(rec.db_id, fs.begin_write, directory, filename)
            try:
                async for chunk in chunks:
                    if up.size + len(chunk) > max_bytes:
                        raise PayloadTooLarge("file too large", max_bytes=max_bytes)
                    await self.threads.run(rec.db_id, up.write, chunk)
                entry = await self.threads.run(rec.db_id, up.commit)
            except BaseException:
                await self.threads.run(rec.db_id, up.abort)
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

        await self.threads.run(rec.db_id, work)

    async def make_dir(self, p: Principal, ref: str, path: str) -> FileInfo:
        rec = await self._running(p, ref)

        def work() -> FileInfo:
            with self._fs(rec) as fs:
                return _file_info(fs.mkdir(path))

        return await self.threads.run(rec.db_id, work)

    async def open_terminal(self, p: Principal, ref: str, cols: int, rows: int) -> TerminalProcess:
        rec = await self._running(p, ref)
        assert rec.pid is not None
        shell = await self.threads.run(rec.db_id, containerroot.find_shell, rec.pid)
        env = [e for e in rec.spec.get("env", []) if not e.startswith("TERM=")]
        proc = ProcessSpec(
            args=[shell, "-l"] if shell != "/bin/sh" else [shell],
            env=[*env, "TERM=xterm-256color"],
            cwd=HOME,
            uid=int(rec.spec.get("uid", 0)),
            gid=int(rec.spec.get("gid", 0)),
            tty=True,
        )
        child, master = await asyncio.to_thread(
            self.runtime.exec, rec.id, rec.pid, proc, seccomp=_seccomp(rec)
        )
        assert master is not None
        set_size(master, cols or 80, rows or 24)
        await self._touch(rec)
        exits = self.exits

        async def wait() -> int | None:
            return await exits.wait(child.pid)

        return TerminalProcess(master=master, pid=child.pid, pts="", wait=wait)

    async def terminal_session(
        self, p: Principal, ref: str, session_id: str, new: bool, cols: int, rows: int
    ) -> tuple[TerminalSession, bool]:
        """The session ``session_id`` of a running container, started if needed."""
        rec = await self._running(p, ref)

        async def start() -> TerminalProcess:
            return await self.open_terminal(p, ref, cols, rows)

        return await self.terminals.open(rec.db_id, session_id, new, start)
