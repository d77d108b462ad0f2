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
#: What ``attach`` returns after ``~.``: ssh's status for a connection it dropped.
ESCAPE_STATUS = 255


def parse_detach_keys(spec: str) -> bytes:
    """The bytes of a docker-style key list: ``ctrl-p,ctrl-q``, ``ctrl-a,d``, ``""`` (off).

    Each item is one character or ``ctrl-X`` for X in ``a``-``z``, ``@``, ``[``, ``\\``,
    ``]``, ``^``, ``_``. Raises ValueError for anything else.
    """
    keys = bytearray()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            if spec.strip():
                raise ValueError(f"empty key in detach keys {spec!r}")
            continue
        if item.lower().startswith("ctrl-") and len(item) == 6:
            ch = item[5].lower()
            if "a" <= ch <= "z":
                keys.append(ord(ch) - ord("a") + 1)
            elif ch in "@[\\]^_":
                keys.append(ord(ch) - ord("@"))
            else:
                raise ValueError(f"unknown control key {item!r}")
        elif len(item) == 1 and item.isascii():
            keys.append(ord(item))
        else:
            raise ValueError(f"unknown key {item!r} in detach keys (e.g. ctrl-p,ctrl-q)")
    return bytes(keys)


def _next_sequence_state(state: int, b: int) -> int:
    if b == 0x1B:
        return 1
    if state == 1:
        return 2 if b == ord("[") else 0
    return 0 if 0x40 <= b <= 0x7E else 2


class KeyFilter:
    """Watches typed bytes for the detach sequence and for ssh's ``~.`` escape.

    ``feed`` returns the bytes to send to the shell and what the user asked for
    (``"detach"``, ``"escape"`` or None). Like ssh, the escape character counts only
    at the start of a line and typing it twice sends it once; like podman, a partial
    detach sequence is held back and sent as typed if the next key does not go on
    with it.
    """

    def __init__(self, detach: bytes, escape: bytes | None = b"~") -> None:
        self.detach = detach
        self.escape = escape[0] if escape else None
        self._held = b""  # a prefix of ``detach`` typed so far
        self._line_start = True
        self._escaping = False
        self._sequence = 0  # 0: none, 1: after ESC, 2: inside ESC [ ... (CSI)

    def feed(self, data: bytes) -> tuple[bytes, str | None]:
        out = bytearray()
        for b in data:
            if self._escaping:
                self._escaping = False
                if b == ord("."):
                    return bytes(out), "escape"
                out.append(self.escape or b)
                if b == self.escape:
                    continue
            if self.detach:
                if b == self.detach[len(self._held)]:
                    self._held += bytes((b,))
                    if self._held == self.detach:
                        self._held = b""
                        return bytes(out), "detach"
                    continue
                if self._held:
                    out += self._held
                    self._held = b""
                    if b == self.detach[0]:
                        self._held = bytes((b,))
                        continue
            if self._sequence or b == 0x1B:
                # An escape sequence (ESC [ ... final) is the terminal talking, such as
                # its answer to the shell's cursor-position query after each Enter:
                # it must not end the "start of a line" that ~ needs.
                out.append(b)
                self._sequence = _next_sequence_state(self._sequence, b)
                continue
            if b == self.escape and self._line_start:
                self._escaping = True
                self._line_start = False
                continue
            out.append(b)
            self._line_start = b in (0x0D, 0x0A)
        return bytes(out), None


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
        elif frame.type == "error" and frame.exit_code is not None:
            # The shell exited: its status is ours, as with ssh.
            status = frame.exit_code if 0 <= frame.exit_code <= 255 else 1
        elif frame.type == "error":
            status = 1
            # \r\n because the local tty is raw: a bare \n would not return the cursor.
            write_all(stderr_fd, f"\r\nrexec: {frame.data or 'terminal error'}\r\n".encode())
        elif frame.type == "ping":
            await term.send_frame(TerminalFrame(type="pong"))
    return status


async def attach(
    term: TerminalSession,
    *,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    detach_keys: bytes = b"\x10\x11",
    escape_char: bytes | None = b"~",
) -> int:
    """Bridge a connected terminal session and the local terminal until the daemon closes.

    Returns the shell's exit status when it exits, 1 if the daemon reported an error,
    128+N when signal N (SIGTERM, SIGHUP) ended it, 0 after the detach keys (the
    session keeps running) and 255 after ``~.`` at the start of a line. The tty is
    restored on every way out.
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

    left: asyncio.Future[int] = loop.create_future()
    session = term.session or "default"

    async def send_keys() -> None:
        # Keys arrive as bytes and a multi-byte character may be split across reads.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        watch = KeyFilter(detach_keys, escape_char)
        while data := await keys.get():
            data, action = watch.feed(data)
            await term.send_input(decoder.decode(data))
            if action == "detach":
                write_all(
                    stderr_fd,
                    f"\r\nrexec: detached from session {session}; reattach with: "
                    f"rexec connect {term.container} --session {session}\r\n".encode(),
                )
                left.set_result(0)
                return
            if action == "escape":
                write_all(stderr_fd, b"\r\nrexec: connection closed (~.)\r\n")
                left.set_result(ESCAPE_STATUS)
                return
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
    workers: list[asyncio.Task[Any]] = []
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
                output = asyncio.create_task(_forward_output(term, stdout_fd, stderr_fd))
                workers.append(output)
                await asyncio.wait((output, left), return_when=asyncio.FIRST_COMPLETED)
                if left.done():
                    # Leaving on purpose: close the socket; the daemon keeps the session.
                    await term.close()
                    return left.result()
                return output.result()
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
