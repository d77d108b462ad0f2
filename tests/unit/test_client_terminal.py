"""``rexec connect`` driven through a real pty against the fake terminal WebSocket."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rexecd.client.sdk import AsyncClient
from rexecd.client.terminal import RawMode, attach
from tests.deadlines import scaled
from tests.unit.fakes.daemon import TOKEN, FakeDaemon, ServerThread, serve

ROOT = Path(__file__).resolve().parents[2]
# The child makes the pty its controlling terminal, so a window-size change on the
# master delivers SIGWINCH to it as it would in a real terminal emulator.
# The CLI as a terminal's foreground job: its controlling tty is the test's PTY, and
# SIGINT is Python's KeyboardInterrupt even when the suite itself runs with SIGINT
# ignored (a background job of a non-interactive shell, nohup), which a child inherits.
LAUNCH = """
import fcntl, signal, sys, termios
signal.signal(signal.SIGINT, signal.default_int_handler)
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
from rexecd.client.cli import main
sys.exit(main(sys.argv[1:]))
"""


def set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Pty:
    """A pty pair whose master side is drained into ``output`` by a thread."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.output = b""
        self._stop = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                self.output += chunk

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def rig() -> Iterator[tuple[FakeDaemon, str, Pty]]:
    daemon = FakeDaemon()
    daemon.add("web")
    pty = Pty()
    set_size(pty.slave, 80, 24)
    with ServerThread(daemon) as host:
        yield daemon, host, pty
    pty.close()


def spawn(pty: Pty, host: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REXEC_HOST": host, "REXEC_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *args],
        stdin=pty.slave,
        stdout=pty.slave,
        stderr=pty.slave,
        start_new_session=True,
        cwd=ROOT,
        env=env,
    )


def is_raw(attrs: list[object]) -> bool:
    lflag = attrs[3]
    assert isinstance(lflag, int)
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


def connected(daemon: FakeDaemon, proc: subprocess.Popen[bytes]) -> None:
    # The first resize is sent after raw mode is on, so from here the tty is raw.
    wait_until(lambda: bool(daemon.resizes()) or proc.poll() is not None, "the first resize")
    assert proc.poll() is None, "rexec connect exited early"


def test_connect_forwards_io_resizes_and_restores(rig: tuple[FakeDaemon, str, Pty]) -> None:
    daemon, host, pty = rig
    set_size(pty.slave, 100, 30)
    before = termios.tcgetattr(pty.slave)
    assert not is_raw(before)
    proc = spawn(pty, host, "connect", "web", "--session", "s1")
    try:
        connected(daemon, proc)
        assert daemon.resizes() == [(100, 30)]
        assert daemon.terminal_queries == [{"id": "s1"}]
        assert is_raw(termios.tcgetattr(pty.slave))

        # Keys reach the server as input frames (UTF-8 intact, Ctrl-C not a signal)...
        os.write(pty.master, "héllo\x03".encode())
        wait_until(lambda: daemon.inputs() == "héllo\x03", "the input frames")
        # ...and output frames come back to the terminal, byte for byte.
        wait_until(lambda: "héllo\x03" in pty.text(), "the echoed output")
        assert "[resize 100x30]" in pty.text()

        set_size(pty.master, 120, 40)
        wait_until(lambda: (120, 40) in daemon.resizes(), "the SIGWINCH resize")

        os.write(pty.master, b"exit\r")
        assert proc.wait(scaled(15)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: "bye" in pty.text(), "the goodbye output")
    assert termios.tcgetattr(pty.slave) == before


def test_interrupt_restores_the_terminal(rig: tuple[FakeDaemon, str, Pty]) -> None:
    daemon, host, pty = rig
    before = termios.tcgetattr(pty.slave)
    proc = spawn(pty, host, "connect", "web")
    try:
        connected(daemon, proc)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(scaled(15)) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert termios.tcgetattr(pty.slave) == before


def test_sigterm_restores_the_terminal(rig: tuple[FakeDaemon, str, Pty]) -> None:
    daemon, host, pty = rig
    before = termios.tcgetattr(pty.slave)
    proc = spawn(pty, host, "connect", "web")
    try:
        connected(daemon, proc)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(scaled(15)) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert termios.tcgetattr(pty.slave) == before


def test_server_error_frame_exits_1_and_restores(rig: tuple[FakeDaemon, str, Pty]) -> None:
    daemon, host, pty = rig
    before = termios.tcgetattr(pty.slave)
    proc = spawn(pty, host, "connect", "web")
    try:
        connected(daemon, proc)
        os.write(pty.master, b"fail\r")
        assert proc.wait(scaled(15)) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: "rexec: shell crashed" in pty.text(), "the error message")
    assert termios.tcgetattr(pty.slave) == before


def test_refused_connect_never_touches_the_terminal(rig: tuple[FakeDaemon, str, Pty]) -> None:
    _, host, pty = rig
    before = termios.tcgetattr(pty.slave)
    proc = spawn(pty, host, "connect", "ghost")
    assert proc.wait(scaled(15)) == 1
    wait_until(lambda: "rexec: container not found (404)" in pty.text(), "the error message")
    assert termios.tcgetattr(pty.slave) == before


def test_raw_mode_restores_on_exception() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(KeyboardInterrupt), RawMode(slave) as raw:
            assert raw.active and is_raw(termios.tcgetattr(slave))
            raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == before
        # Not a tty: nothing to do, nothing to restore.
        r, w = os.pipe()
        with RawMode(r) as raw:
            assert not raw.active
        os.close(r)
        os.close(w)
    finally:
        os.close(master)
        os.close(slave)


async def test_attach_with_piped_stdin() -> None:
    daemon = FakeDaemon()
    daemon.add("web")
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(stdin_w, b"ls\rexit\r")
    os.close(stdin_w)
    try:
        async with (
            serve(daemon) as host,
            AsyncClient(host, TOKEN) as client,
            client.terminal("web") as term,
        ):
            code = await attach(term, stdin_fd=stdin_r, stdout_fd=out_w, stderr_fd=out_w)
        assert code == 0
        os.close(out_w)
        out_w = -1
        with os.fdopen(out_r, "rb") as f:
            out_r = -1
            output = f.read().decode()
    finally:
        for fd in (stdin_r, out_r, out_w):
            if fd >= 0:
                os.close(fd)
    assert daemon.inputs() == "ls\rexit\r"
    # No tty, no size to report.
    assert daemon.resizes() == []
    assert output.endswith("exit\r\r\nbye\r\n")


async def test_attach_with_stdin_from_a_regular_file(tmp_path: Path) -> None:
    # epoll cannot watch a regular file, so this takes the reader-thread path.
    daemon = FakeDaemon()
    daemon.add("web")
    keys = tmp_path / "keys"
    keys.write_bytes("pwd\rdéjà\rexit\r".encode())
    out = tmp_path / "out"
    with keys.open("rb") as stdin, out.open("wb") as stdout:
        async with (
            serve(daemon) as host,
            AsyncClient(host, TOKEN) as client,
            client.terminal("web") as term,
        ):
            code = await attach(
                term, stdin_fd=stdin.fileno(), stdout_fd=stdout.fileno(), stderr_fd=stdout.fileno()
            )
    assert code == 0
    assert daemon.inputs() == "pwd\rdéjà\rexit\r"
    assert out.read_bytes().endswith(b"bye\r\n")
