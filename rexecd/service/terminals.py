"""Terminal sessions: a shell on a PTY per (container, session id), its scrollback, and
the one client attached to it at a time.

One pump task per session reads the PTY master. While a client is attached, the
pump waits for each send to finish before reading again, so a slow client slows the
shell (the PTY buffer fills and its writes block) instead of growing memory. While
no client is attached the pump keeps reading into a bounded scrollback ring, which a
reconnecting client gets replayed first. A session with no client for
``idle_timeout_s`` is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from rexecd.errors import QuotaExceeded
from rexecd.runtime.pty import set_size
from rexecd.service.interface import TerminalProcess

log = logging.getLogger(__name__)
READ_CHUNK = 65536
MAX_WINSIZE = 0xFFFF
# Once the shell has exited, output it wrote last may still be on its way through the
# PTY: read on until it has been quiet this long (but no longer than the cap, in case a
# job it left behind keeps writing).
EXIT_QUIET_S = 0.05
EXIT_DRAIN_MAX_S = 1.0


def _read_more(fd: int, first: bytes) -> bytes:
    """``first`` plus whatever else the PTY has right now, up to READ_CHUNK: a PTY hands
    out a few KiB per read, and one WebSocket frame per read would halve throughput."""
    if not first:
        return first
    buf = bytearray(first)
    while len(buf) < READ_CHUNK:
        try:
            more = os.read(fd, READ_CHUNK - len(buf))
        except (BlockingIOError, OSError):
            break
        if not more:
            break
        buf += more
    return bytes(buf)


class TerminalClient(Protocol):
    """The side a session sends to (a WebSocket, in the API layer)."""

    async def send_output(self, data: bytes) -> None: ...

    async def end(self, kind: str, message: str, exit_code: int | None = None) -> None:
        """Tell the client why the session is over (``exit_code``: the shell's status,
        when its exit ended the session) and close it."""
        ...

    def abort(self) -> None:
        """Drop the connection at once (another client took the session over)."""
        ...


class Scrollback:
    """The last ``limit`` bytes of output."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self.limit:
            del self._buf[: len(self._buf) - self.limit]

    def snapshot(self) -> bytes:
        return bytes(self._buf)


@dataclass(eq=False)
class TerminalSession:
    key: tuple[str, str]
    proc: TerminalProcess
    scrollback: Scrollback
    idle_timeout: float
    on_end: Callable[[TerminalSession], None]
    client: TerminalClient | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pump_task: asyncio.Task[None] | None = None
    idle_handle: asyncio.TimerHandle | None = None
    ended: bool = False
    # Set by terminate() (container stopped, idle, replaced); otherwise the shell's exit.
    end_reason: tuple[str, str] | None = None
    # The shell's exit, seen through a pidfd: a job it left in the background may keep
    # the PTY slave open, so EIO on the master alone would never end the session.
    pidfd: int = -1
    exited_at: float | None = None
    wake: Callable[[], None] | None = None
    # The shell's exit status once it has been reaped.
    exit_code: int | None = None

    def start(self) -> None:
        os.set_blocking(self.proc.master, False)
        loop = asyncio.get_running_loop()
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except ProcessLookupError:
            self.exited_at = loop.time()
        else:
            loop.add_reader(self.pidfd, self._shell_exited)
        self.pump_task = asyncio.ensure_future(self._pump())
        self._arm_idle()

    def _shell_exited(self) -> None:
        loop = asyncio.get_running_loop()
        self._close_pidfd()
        self.exited_at = loop.time()
        if self.wake is not None:
            self.wake()

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    async def _read(self) -> bytes:
        """The next output; b"" once every slave fd is closed, or the shell has exited
        and its last output is drained."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.proc.master

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        self.wake = ready
        try:
            while True:
                try:
                    return _read_more(fd, os.read(fd, READ_CHUNK))
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.EIO:  # every slave fd closed: the shell is gone
                        return b""
                    raise
                if self.exited_at is None:
                    await fut
                else:
                    left = min(EXIT_QUIET_S, self.exited_at + EXIT_DRAIN_MAX_S - loop.time())
                    if left <= 0:
                        return b""
                    try:
                        await asyncio.wait_for(asyncio.shield(fut), left)
                    except TimeoutError:
                        return b""
                fut = loop.create_future()
        finally:
            self.wake = None
            loop.remove_reader(fd)

    async def _pump(self) -> None:
        try:
            while True:
                data = await self._read()
                if not data:
                    break
                async with self.lock:
                    self.scrollback.append(data)
                    if self.client is not None:
                        try:
                            await self.client.send_output(data)
                        except Exception:  # the client went away; the session stays
                            self.client = None
                            self._arm_idle()
            status = await self.proc.wait()
            self.exit_code = status
            if self.end_reason is None:
                self.end_reason = ("exit", f"shell exited with status {status}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("terminal pump failed")
        finally:
            await self._finish()

    async def _finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self._close_pidfd()
        client, self.client = self.client, None
        if client is not None:
            kind, message = self.end_reason or ("error", "session ended")
            with contextlib.suppress(Exception):
                await client.end(kind, message, self.exit_code if kind == "exit" else None)
        with contextlib.suppress(OSError):
            os.close(self.proc.master)
        self.on_end(self)

    def _arm_idle(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.client is None and not self.ended:
            loop = asyncio.get_running_loop()
            self.idle_handle = loop.call_later(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.client is None and not self.ended:
            log.info("terminal session %s idle for %.0f s: ending it", self.key, self.idle_timeout)
            self.terminate("error", "session ended after being idle")

    def terminate(self, kind: str, message: str) -> None:
        """Hang up the shell; the pump then reports ``message`` to the client and ends."""
        self.end_reason = (kind, message)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGHUP)
        asyncio.get_running_loop().call_later(2.0, self._kill)

    def _kill(self) -> None:
        if not self.ended:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def attach(self, client: TerminalClient) -> bytes:
        """Make ``client`` the session's client; returns the scrollback to replay first.

        The previous client is dropped. The caller must send the returned bytes before
        calling ``resume`` so that output is neither lost nor reordered.
        """
        old = self.client
        if old is not None:
            old.abort()  # unblocks a pump stuck sending to a stalled client
        await self.lock.acquire()
        self.client = None
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        return self.scrollback.snapshot()

    def resume(self, client: TerminalClient) -> None:
        """Second half of ``attach``: live output flows to ``client`` from now on."""
        self.client = client
        self.lock.release()

    def detach(self, client: TerminalClient) -> None:
        if self.client is client:
            self.client = None
            self._arm_idle()

    async def write(self, data: bytes) -> None:
        """Input to the shell; waits (without blocking the loop) while the PTY is full."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            if self.ended:  # the master is closed; its fd number may already be reused
                return
            try:
                n = os.write(self.proc.master, view)
                view = view[n:]
            except BlockingIOError:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self.proc.master, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_writer(self.proc.master)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise

    def resize(self, cols: int, rows: int) -> None:
        # A 0 is ignored (API.md); so is what a winsize cannot hold (unsigned short),
        # which would otherwise raise out of the socket's receive loop and drop it.
        if 0 < cols <= MAX_WINSIZE and 0 < rows <= MAX_WINSIZE and not self.ended:
            with contextlib.suppress(OSError):
                set_size(self.proc.master, cols, rows)


@dataclass(eq=False)
class _Opening:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class TerminalRegistry:
    """All live sessions, by (container db_id, session id)."""

    def __init__(
        self, scrollback_bytes: int, idle_timeout_s: float, max_sessions: int = 16
    ) -> None:
        self.scrollback_bytes = scrollback_bytes
        self.idle_timeout_s = idle_timeout_s
        # Per container: session ids are the client's choice and a detached session
        # lives on (its PTY, pidfd and scrollback in the daemon) until idle_timeout_s.
        self.max_sessions = max_sessions
        self._starting: dict[str, int] = {}
        self._sessions: dict[tuple[str, str], TerminalSession] = {}
        # One lock per key being opened, with how many openers hold or await it: the
        # session id is the client's choice, so a lock kept per id ever asked for would
        # grow with requests.
        self._opening: dict[tuple[str, str], _Opening] = {}

    def get(self, db_id: str, session_id: str) -> TerminalSession | None:
        s = self._sessions.get((db_id, session_id))
        return s if s is not None and not s.ended else None

    async def open(
        self,
        db_id: str,
        session_id: str,
        new: bool,
        start: Callable[[], Awaitable[TerminalProcess]],
    ) -> tuple[TerminalSession, bool]:
        """The existing session (unless ``new``) or a fresh one; bool: was it fresh."""
        key = (db_id, session_id)
        opening = self._opening.setdefault(key, _Opening())
        opening.users += 1
        try:
            async with opening.lock:
                cur = self.get(db_id, session_id)
                if cur is not None and not new:
                    return cur, False
                if cur is not None:
                    cur.terminate("error", "replaced by a new session")
                else:
                    self._check_room(db_id)
                # Counted while the shell starts: other session ids open concurrently.
                self._starting[db_id] = self._starting.get(db_id, 0) + 1
                try:
                    proc = await start()
                finally:
                    left = self._starting[db_id] - 1
                    if left:
                        self._starting[db_id] = left
                    else:
                        del self._starting[db_id]
                s = TerminalSession(
                    key, proc, Scrollback(self.scrollback_bytes), self.idle_timeout_s, self._forget
                )
                self._sessions[key] = s
                s.start()
                return s, True
        finally:
            opening.users -= 1
            if opening.users == 0:
                del self._opening[key]

    def _check_room(self, db_id: str) -> None:
        live = sum(1 for s in self.sessions_of(db_id) if not s.ended)
        live += self._starting.get(db_id, 0)
        if live >= self.max_sessions:
            raise QuotaExceeded(
                f"terminal session limit reached: at most {self.max_sessions} per "
                "container; reuse a session id or close one",
                current=live,
                limit=self.max_sessions,
            )

    def _forget(self, s: TerminalSession) -> None:
        if self._sessions.get(s.key) is s:
            del self._sessions[s.key]

    def sessions_of(self, db_id: str) -> list[TerminalSession]:
        return [s for k, s in self._sessions.items() if k[0] == db_id]

    def close_container(self, db_id: str, kind: str, message: str) -> None:
        """The container stopped or was deleted: end its sessions with ``message``."""
        for s in self.sessions_of(db_id):
            s.terminate(kind, message)

    async def close_all(self) -> None:
        for s in list(self._sessions.values()):
            if s.pump_task is not None:
                s.pump_task.cancel()
                with contextlib.suppress(BaseException):
                    await s.pump_task
