"""The local side of ``rexec exec -i/-t``: stdin into the exec stream, its output out,
signals and window sizes forwarded, and the command's exit status handed back."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from rexecd.client.sdk import ApiError, ExecStream
from rexecd.client.terminal import RawMode, terminal_size, write_all

READ_SIZE = 65536
# Forwarded to the command when no PTY turns the keys into bytes (without -t).
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


async def read_chunks(fd: int) -> AsyncIterator[bytes]:
    """What arrives on ``fd``, chunk by chunk, until EOF. The next chunk is read only
    once the caller has taken the last, so a slow daemon slows the reading: a large
    file piped in is never held in memory as a whole."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Event | None = asyncio.Event()
    try:
        loop.add_reader(fd, ready.set)  # type: ignore[union-attr]
    except PermissionError:
        ready = None  # epoll refuses regular files and /dev/null: read those in a thread
    try:
        if ready is not None:
            os.set_blocking(fd, False)
        while True:
            if ready is None:
                data = await loop.run_in_executor(None, os.read, fd, READ_SIZE)
            else:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    ready.clear()
                    await ready.wait()
                    continue
            if not data:
                return
            yield data
    except OSError:
        return
    finally:
        if ready is not None:
            loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)


async def run_stream(
    stream: ExecStream,
    *,
    interactive: bool,
    tty: bool,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
) -> int:
    """Bridge a connected exec stream and this process's stdio; the command's status.

    An error the daemon ends the stream with (a timeout) is raised as ApiError.
    """
    loop = asyncio.get_running_loop()
    size_fd = stdout_fd if os.isatty(stdout_fd) else stdin_fd
    undo: list[Callable[[], object]] = []
    workers: list[asyncio.Task[Any]] = []

    async def send_stdin() -> None:
        async for chunk in read_chunks(stdin_fd):
            await stream.send_stdin(chunk)
        await stream.close_stdin()

    async def send_size() -> None:
        size = terminal_size(size_fd)
        if size is not None:
            await stream.resize(*size)

    def on_signal(signum: int) -> None:
        workers.append(asyncio.ensure_future(stream.signal(signum)))

    sys.stdout.flush()
    sys.stderr.flush()
    with RawMode(stdin_fd) if tty and interactive else contextlib.nullcontext():
        try:
            if interactive:
                workers.append(asyncio.ensure_future(send_stdin()))
            elif not tty:
                await stream.close_stdin()  # nothing to read: the command sees EOF at once
            handlers: list[tuple[int, Callable[[], object]]] = []
            if tty:
                handlers.append(
                    (signal.SIGWINCH, lambda: workers.append(asyncio.ensure_future(send_size())))
                )
            # In raw mode Ctrl-C is a byte for the remote PTY; these come from elsewhere.
            for sig in _FORWARDED if not tty else (signal.SIGTERM, signal.SIGHUP):
                handlers.append((sig, functools.partial(on_signal, int(sig))))
            for num, handler in handlers:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.add_signal_handler(num, handler)
                    undo.append(functools.partial(loop.remove_signal_handler, num))
            async for kind, value in stream:
                if kind == "stdout":
                    write_all(stdout_fd, value)
                elif kind == "stderr":
                    write_all(stderr_fd, value)
                elif kind == "exit":
                    code: int = value
                    return code if 0 <= code <= 255 else 1
                elif kind == "error":
                    error: ApiError = value
                    raise error
            raise ApiError(502, {"error": "the exec stream closed without an exit status"})
        finally:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    step()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
