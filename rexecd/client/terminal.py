"""The interactive side of ``rexec connect``: raw mode, keystrokes in, shell output out."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from rexecd.client.sdk import TerminalSession
from rexecd.models import TerminalFrame

_READ_SIZE = 65536


class RawMode:
    """Puts a tty in raw mode and always gives it back its saved attributes.

    Raw mode hands every key (Ctrl-C, Ctrl-Z, arrows) to the remote shell instead of
    the local line discipline. Without a tty it does nothing.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def __enter__(self) -> Self:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            # TCSANOW, not setraw's default TCSAFLUSH: keys typed while connecting are kept.
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def restore(self) -> None:
        if self._saved is not None:
            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:
                # The terminal is gone (hang-up); there is nothing left to restore.
                pass

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


def terminal_size(fd: int) -> tuple[int, int] | None:
    """``(cols, rows)`` of the tty on ``fd``, or None when it is not a sized tty."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if size.columns <= 0 or size.lines <= 0:
        return None
    return size.columns, size.lines


def write_all(fd: int, data: bytes) -> None:
    """Write every byte, even to a non-blocking fd or through partial writes."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


async def _forward_output(term: TerminalSession, stdout_fd: int, stderr_fd: int) -> int:
    status = 0
    async for frame in term:
        if frame.type == "output" and frame.data:
            write_all(stdout_fd, frame.data.encode("utf-8", "replace"))
        elif frame.type == "error":
            status = 1
            # \r\n because the local tty is raw: a bare \n would not return the cursor.
            write_all(stderr_fd, f"\r\nrexec: {frame.data or 'terminal error'}\r\n".encode())
        elif frame.type == "ping":
            await term.send_frame(TerminalFrame(type="pong"))
    return status


async def attach(
    term: TerminalSession, *, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2
) -> int:
    """Bridge a connected terminal session and the local terminal until the daemon closes.

    Returns 0 when the daemon ends the session, 1 if it reported an error, and 128+N
    when signal N (SIGTERM, SIGHUP) ended it. The tty is restored on every way out.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    size_fd = stdout_fd if os.isatty(stdout_fd) else stdin_fd
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    resized = asyncio.Event()
    signals: list[int] = []
    undo: list[Callable[[], object]] = []

    def on_stdin() -> None:
        try:
            data = os.read(stdin_fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin_fd)
        keys.put_nowait(data)

    def on_signal(signum: int) -> None:
        signals.append(signum)
        task.cancel()

    async def read_in_thread() -> None:
        while True:
            try:
                data = await loop.run_in_executor(None, os.read, stdin_fd, _READ_SIZE)
            except OSError:
                data = b""
            keys.put_nowait(data)
            if not data:
                return

    async def send_keys() -> None:
        # Keys arrive as bytes and a multi-byte character may be split across reads.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while data := await keys.get():
            await term.send_input(decoder.decode(data))
        await term.send_input(decoder.decode(b"", final=True))

    async def send_sizes() -> None:
        while True:
            await resized.wait()
            resized.clear()
            size = terminal_size(size_fd)
            if size is not None:
                await term.resize(*size)

    sys.stdout.flush()
    sys.stderr.flush()
    workers: list[asyncio.Task[None]] = []
    try:
        with RawMode(stdin_fd):
            try:
                try:
                    loop.add_reader(stdin_fd, on_stdin)
                    undo.append(lambda: loop.remove_reader(stdin_fd))
                except PermissionError:
                    # epoll refuses regular files and /dev/null; read those from a thread.
                    workers.append(asyncio.create_task(read_in_thread()))
                for signum, handler in (
                    (signal.SIGWINCH, resized.set),
                    (signal.SIGTERM, lambda: on_signal(signal.SIGTERM)),
                    (signal.SIGHUP, lambda: on_signal(signal.SIGHUP)),
                ):
                    try:
                        loop.add_signal_handler(signum, handler)
                    except (ValueError, RuntimeError):
                        # Not the main thread (an embedding program): go without it.
                        continue
                    undo.append(functools.partial(loop.remove_signal_handler, signum))
                resized.set()  # the shell starts at 80x24 until it is told the real size
                workers += [asyncio.create_task(send_keys()), asyncio.create_task(send_sizes())]
                return await _forward_output(term, stdout_fd, stderr_fd)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                for step in reversed(undo):
                    with contextlib.suppress(Exception):
                        step()
    except asyncio.CancelledError:
        if not signals:
            raise
        task.uncancel()
        return 128 + signals[0]
