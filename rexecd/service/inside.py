"""Container manager: work inside a running container (exec, stats, files, terminals)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import (
    ChildSetupError,
    ContainerNotFound,
    ContainerNotRunning,
    PayloadTooLarge,
    RexecError,
    RuntimeFailure,
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
from rexecd.runtime import procinfo
from rexecd.runtime.container import merge_env
from rexecd.runtime.containerfs import ContainerFS
from rexecd.runtime.pty import set_size
from rexecd.runtime.seccomp import DEFAULT as DEFAULT_SECCOMP
from rexecd.runtime.spec import ProcessSpec
from rexecd.runtime.users import resolve_user
from rexecd.service import quotas
from rexecd.service.auth import Principal
from rexecd.service.core import (
    HOME,
    SHELLS,
    ManagerCore,
    MiB,
    _file_info,
)
from rexecd.service.execstream import STDERR, STDOUT, StreamProcess, failed_stream
from rexecd.service.execution import run_exec, setup_failure
from rexecd.service.interface import FileDownload, TerminalProcess
from rexecd.service.storethread import in_store_thread
from rexecd.service.terminals import TerminalSession

log = logging.getLogger(__name__)


def _seccomp(rec: ContainerRecord) -> str:
    """The seccomp profile ``rec`` started with (containers started before profiles
    were recorded run the default one)."""
    return str(rec.spec.get("seccomp", DEFAULT_SECCOMP))


class InsideOps(ManagerCore):
    """Work inside a running container: exec, stats, files and terminals."""

    async def _running(self, p: Principal, ref: str) -> ContainerRecord:
        rec = await self._find(p, ref)
        if rec.status != "running" or rec.pid is None:
            raise ContainerNotRunning("container is not running", status=rec.status)
        return rec

    async def _touch(self, rec: ContainerRecord) -> None:
        await self._update(rec.db_id, last_used_at=utcnow())

    def _ids(self, rec: ContainerRecord, user: str | None) -> tuple[int, int, list[int]]:
        if user is None:
            return int(rec.spec.get("uid", 0)), int(rec.spec.get("gid", 0)), []
        assert rec.pid is not None
        ident = resolve_user(user, [Path(f"/proc/{rec.pid}/root")])
        return ident.uid, ident.gid, ident.additional_gids

    async def _exec_spec(self, rec: ContainerRecord, req: ExecRequest, tty: bool) -> ProcessSpec:
        uid, gid, groups = await asyncio.to_thread(self._ids, rec, req.user)
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
        rec = await self._find(p, ref)

        async def alive() -> bool:
            now = await in_store_thread(self.store.get_container, rec.db_id)
            return now is not None and now.status in ("creating", "configuring", "running")

        return self.logs.follow(rec.id, follow, alive)

    async def _gone_while_entering(self, rec: ContainerRecord) -> None:
        """Raise NotFound/Conflict if ``rec`` was deleted or stopped under a request."""
        async with self._lock(rec.db_id):  # a stop under way finishes first
            now = await in_store_thread(self.store.get_container, rec.db_id)
        if now is None:
            raise ContainerNotFound("container not found")
        alive = rec.pid is not None and procinfo.is_same_process(rec.pid, rec.pid_start_time)
        if now.status != "running" or now.pid != rec.pid or not alive:
            raise ContainerNotRunning("container is not running", status=now.status)

    async def stats(self, p: Principal, ref: str) -> Stats:
        rec = await self._find(p, ref)
        return await asyncio.to_thread(self._stats, rec)

    def _stats(self, rec: ContainerRecord) -> Stats:
        res = rec.resources
        disk_used, disk_limit = self._disk_space(rec)
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
                disk_limit=disk_limit,
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
            disk_limit=disk_limit,
            net_rx=rx,
            net_tx=tx,
            oom_kills=s.oom_kills,
        )

    def _disk_space(self, rec: ContainerRecord) -> tuple[int, int]:
        """``(used, limit)`` bytes of the container's storage."""
        vol = self._vol(rec)
        if vol is None or self.storage is None:
            used = _du(self.runtime.dirs(rec.id).upper) + _du(self._volume_dir(rec))
            return used, rec.resources.disk_mb * MiB
        try:
            used, limit = self.storage.space(vol)
        except RexecError as exc:
            log.warning("disk space of %s: %s", rec.name, exc.message)
            return 0, rec.resources.disk_mb * MiB
        return used, limit or rec.resources.disk_mb * MiB

    def _fs(self, rec: ContainerRecord) -> ContainerFS:
        """The container's files, written with its user's host ids: in its user
        namespace's range (``userns_base``) when it has one."""
        assert rec.pid is not None
        base = int(rec.spec.get("userns_base", 0))
        uid, gid = int(rec.spec.get("uid", 0)), int(rec.spec.get("gid", 0))
        return ContainerFS(rec.pid, base + uid, base + gid)

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
