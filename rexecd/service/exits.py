"""Exit statuses of the processes the spawner forks (execs, terminal shells), awaited on
the event loop: a process that never exits holds no thread.

A pidfd registered with the loop tells when a process has exited. Its status then
comes from whoever reaps it: normally the spawner, its parent, which reports every
exit over its socket (``Spawner.add_exit_listener``); or the daemon itself, a child
subreaper, when the spawner died first and the process was re-parented to it
(``waitid(P_PIDFD)`` tells, and fails harmlessly when we are not the parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref

from rexecd.runtime import procinfo
from rexecd.runtime.container import Runtime
from rexecd.runtime.spawner import Spawner

# Once a process has exited, how long its parent may take to report the status. The
# spawner reaps at once; this only bounds the wait if it died at that very moment.
REPORT_GRACE_S = 5.0
_RECHECK_S = 0.1


class ProcessExits:
    """Awaitable exit statuses; one per daemon, used from the event loop only."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        # Spawners we listen to: a restarted spawner is a new object.
        self._heard: weakref.WeakSet[Spawner] = weakref.WeakSet()

    def _spawner(self) -> Spawner:
        sp = self._runtime.spawner
        if sp not in self._heard:
            self._heard.add(sp)
            sp.add_exit_listener(self._reported)
        return sp

    def _reported(self, pid: int, status: int) -> None:
        """From the spawner's reader thread: hand the status to the loop."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._deliver, pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        fut = self._pending.get(pid)
        if fut is not None and not fut.done():
            fut.set_result(status)

    async def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """The exit status of ``pid`` (its code, or 128 + signal); None if it still runs
        after ``timeout`` seconds, or if nobody could report it (reaped by someone
        else after its spawner died)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        spawner = self._spawner()
        # One waiter per process at a time (its exec or terminal session).
        fut: asyncio.Future[int] = loop.create_future()
        self._pending[pid] = fut
        pidfd = -1
        try:
            # Registered before this look, so no report can slip between the two.
            status = spawner.wait(pid, 0)
            if status is not None:
                return status
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass  # exited and reaped already: the report is on its way
            else:
                # Reported meanwhile? Then the pid may already name another process.
                status = spawner.wait(pid, 0)
                if status is not None:
                    return status
                if not await self._exited(loop, pidfd, fut, timeout):
                    return None
                if fut.done():
                    return fut.result()
            return await self._collect(spawner, pid, pidfd, fut)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            if self._pending.get(pid) is fut:
                del self._pending[pid]
            # A status reported after we stopped waiting must not linger in the table.
            spawner.wait(pid, 0)

    @staticmethod
    async def _exited(
        loop: asyncio.AbstractEventLoop, pidfd: int, fut: asyncio.Future[int], timeout: float | None
    ) -> bool:
        """True once the process behind ``pidfd`` has exited (or its status came)."""
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(pidfd, ready)
        try:
            done, _ = await asyncio.wait(
                (readable, fut), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            loop.remove_reader(pidfd)
            readable.cancel()
        return bool(done)

    async def _collect(
        self, spawner: Spawner, pid: int, pidfd: int, fut: asyncio.Future[int]
    ) -> int | None:
        """The status of an exited process, from its reaper."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPORT_GRACE_S
        while True:
            if pidfd >= 0:
                status = procinfo.reap_pidfd(pidfd)  # ours if the spawner died first
                if status is not None:
                    return status
            left = deadline - loop.time()
            if left <= 0:
                return spawner.wait(pid, 0)
            with contextlib.suppress(TimeoutError):
                # Short steps: a spawner that dies now leaves the zombie to us.
                return await asyncio.wait_for(asyncio.shield(fut), min(left, _RECHECK_S))
