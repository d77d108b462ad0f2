"""An interactive exec: a process in a container with its stdin, stdout and stderr (or
one PTY) wired to a client for as long as the client stays (the exec stream socket).

Like the one-shot exec, no thread is held while the process runs: its fds are read
on the event loop and its exit comes from ``ProcessExits`` (pidfds). Output is
read only once the previous chunk has gone to the client, so a slow client slows
the process (its pipe fills and its writes block) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rexecd.runtime.pty import set_size
from rexecd.service.exits import ProcessExits

STDOUT = 1
STDERR = 2
READ_CHUNK = 65536
# After the process exits, output a background child keeps writing is collected for
# at most this long before the exit is reported.
DRAIN_AFTER_EXIT_S = 0.5
KILL_GRACE_S = 10.0
# What a client may send; anything else (SIGSEGV, real-time signals) is refused.
ALLOWED_SIGNALS = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGTERM,
        signal.SIGKILL,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCONT,
        signal.SIGSTOP,
        signal.SIGTSTP,
        signal.SIGALRM,
    }
)

Send = Callable[[int, bytes], Awaitable[None]]
_reaping: set[asyncio.Future[int | None]] = set()


def parse_signal(value: object) -> int | None:
    """A signal number from ``"INT"``, ``"SIGINT"`` or ``2``; None if not allowed."""
    num: int | None = None
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        with contextlib.suppress(KeyError):
            num = signal.Signals[name].value
    elif type(value) is int:
        num = value
    return num if num in ALLOWED_SIGNALS else None


@dataclass(eq=False)
class StreamProcess:
    """A started process: ``stdin`` is the fd its input goes to (the PTY master with a
    tty), ``outputs`` the (channel, fd) pairs to read; every fd is owned here."""

    pid: int
    tty: bool
    stdin: int
    outputs: list[tuple[int, int]]
    exits: ProcessExits
    timeout: float | None = None
    exit_code: int | None = None
    exited: bool = False
    timed_out: bool = False
    _closed: bool = False
    _client_gone: bool = False
    _fds_closed: set[int] = field(default_factory=set)

    async def run(self, send: Send) -> int | None:
        """Pump output to ``send`` until the process has exited and its output is
        drained; the exit status, or None when it was killed at its deadline."""
        for fd in {self.stdin, *(fd for _, fd in self.outputs)}:
            os.set_blocking(fd, False)
        pumps = [asyncio.ensure_future(self._pump(ch, fd, send)) for ch, fd in self.outputs]
        try:
            if self.exited:  # never started (failed_stream): only its message to send
                await asyncio.gather(*pumps)
                return self.exit_code
            status = await self.exits.wait(self.pid, self.timeout)
            if status is None and self.timeout is not None:
                self.timed_out = True
                self.kill()
                status = await self.exits.wait(self.pid, KILL_GRACE_S)
            self.exited = True
            self.exit_code = status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pumps), DRAIN_AFTER_EXIT_S)
            return None if self.timed_out else status
        except asyncio.CancelledError:
            # Nobody will read the output: the process does not outlive its caller.
            # Its status is still collected, so it does not linger in the spawner's table.
            self.kill()
            reap = asyncio.ensure_future(self.exits.wait(self.pid, KILL_GRACE_S))
            _reaping.add(reap)
            reap.add_done_callback(_reaping.discard)
            raise
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.close()

    async def _pump(self, channel: int, fd: int, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # a PTY whose every slave fd is closed
                    return
                raise
            if not data:
                return
            if self._client_gone:
                continue  # keep draining so the process never blocks on a dead client
            try:
                await send(channel, data)
            except Exception:
                self._client_gone = True

    async def write(self, data: bytes) -> None:
        """Input for the process; waits (without blocking the loop) while its pipe is full."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and not self._closed and self.stdin not in self._fds_closed:
            try:
                view = view[os.write(self.stdin, view) :]
            except BlockingIOError:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self.stdin, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_writer(self.stdin)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EIO):
                    return  # it stopped reading or exited: the rest has nowhere to go
                raise

    async def close_stdin(self) -> None:
        """End of input: the pipe is closed; on a PTY, an EOF character (Ctrl-D) is typed."""
        if self.tty:
            await self.write(b"\x04")
        elif not self._closed and self.stdin not in self._fds_closed:
            self._fds_closed.add(self.stdin)
            os.close(self.stdin)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process's group (it is a session leader)."""
        if not self.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def resize(self, cols: int, rows: int) -> None:
        if self.tty and not self._closed and 0 < cols <= 0xFFFF and 0 < rows <= 0xFFFF:
            with contextlib.suppress(OSError):
                set_size(self.stdin, cols, rows)

    def kill(self) -> None:
        if not self.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in {self.stdin, *(fd for _, fd in self.outputs)}:
            if fd not in self._fds_closed:
                self._fds_closed.add(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)


def failed_stream(exits: ProcessExits, code: int, message: str) -> StreamProcess:
    """A process that could not start, as the client sees it: ``message`` on stderr,
    then exit status ``code`` (126 or 127, as a shell would say)."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(err_w, message.encode()[:4096])  # fits in the pipe: never blocks
    finally:
        os.close(err_w)
        os.close(in_r)
    return StreamProcess(0, False, in_w, [(STDERR, err_r)], exits, exit_code=code, exited=True)
