"""systemd's protocols written by hand: sd_notify datagrams, LISTEN_FDS checks, the
journal's native protocol (fields, binary-safe values, the memfd for large records),
JOURNAL_STREAM detection; and the lifecycle line's exit causes."""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from rexecd import logs, systemd


def _parse_journal(data: bytes) -> dict[str, str]:
    """The fields of a native-protocol datagram, as journald reads them."""
    out: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            out[name.decode()] = value.decode()
            data = rest
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            out[line.decode()] = rest[8 : 8 + size].decode()
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
    return out


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(tmp_path / "n"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
        assert systemd.notify("READY=1", "STATUS=2 running")
        assert rx.recv(4096) == b"READY=1\nSTATUS=2 running"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rexecd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert rx.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert not systemd.notify("READY=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # someone else's watchdog
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert systemd.watchdog_interval() is None


def _child(code: str, fds: list[int], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``fds`` at 3.. and ``env`` (LISTEN_PID=$$ set for it by a shell)."""

    def move() -> None:
        high = [os.dup(fd) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)

    script = textwrap.dedent(code)
    return subprocess.run(
        ["sh", "-c", f'LISTEN_PID=${{LISTEN_PID:-$$}} exec {sys.executable} -c "$0"', script],
        env={**os.environ, **env},
        preexec_fn=move,
        pass_fds=list(range(3, 3 + len(fds))),
        capture_output=True,
        text=True,
        timeout=60,
    )


LISTEN = """
    import os
    from rexecd import systemd
    try:
        socks = systemd.listen_fds()
    except systemd.ActivationError as exc:
        print("error:", exc)
    else:
        print([(s.name, s.where) for s in socks], "LISTEN_FDS" in os.environ)
"""


def test_listen_fds_takes_the_sockets_and_clears_the_environment(tmp_path: Path) -> None:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "s"))
    unix.listen()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    with unix, tcp:
        out = _child(
            LISTEN, [unix.fileno(), tcp.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        )
    assert out.stdout.strip() == (
        f"[('a', 'unix:{tmp_path / 's'}'), ('b', 'tcp:127.0.0.1:{port}')] False"
    ), out.stderr


def test_listen_fds_of_another_pid_are_not_taken(tmp_path: Path) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    with tcp:
        out = _child(LISTEN, [tcp.fileno()], {"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert out.stdout.strip() == "[] False", out.stderr


def test_listen_fds_refuses_a_socket_that_does_not_listen(tmp_path: Path) -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(tmp_path / "d"))
    with dgram:
        out = _child(LISTEN, [dgram.fileno()], {"LISTEN_FDS": "1"})
    assert "error: LISTEN_FDS: fd 3 is not a listening stream socket" in out.stdout, out.stderr


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("rexecd.test", logging.WARNING, __file__, 7, msg, None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_journal_datagram_has_the_structured_fields(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        h = logs.JournalHandler(path)
        try:
            h.emit(_record("two\nlines", CONTAINER_ID="c" * 64, USER="alice", REQUEST_ID="r1"))
            fields = _parse_journal(rx.recv(65536))
        finally:
            h.close()
    assert fields["MESSAGE"] == "two\nlines"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "rexecd"
    assert fields["CONTAINER_ID"] == "c" * 64
    assert fields["USER"] == "alice" and fields["REQUEST_ID"] == "r1"


def test_journal_request_id_comes_from_the_context(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    token = logs.REQUEST_ID.set("abc123")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        h = logs.JournalHandler(path)
        try:
            h.emit(_record("in a request"))
            fields = _parse_journal(rx.recv(65536))
        finally:
            h.close()
            logs.REQUEST_ID.reset(token)
    assert fields["REQUEST_ID"] == "abc123"
    assert "CONTAINER_ID" not in fields


def test_a_record_too_big_for_a_datagram_goes_in_a_memfd(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    big = "x" * (4 * 1024 * 1024)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        h = logs.JournalHandler(path)
        try:
            h.emit(_record(big))
            fds = array.array("i")
            _msg, anc, _flags, _addr = rx.recvmsg(16, socket.CMSG_LEN(fds.itemsize))
            fds.frombytes(anc[0][2][: fds.itemsize])
        finally:
            h.close()
    with os.fdopen(fds[0], "rb") as f:
        # journald maps the file from its start (the shared offset is at its end).
        f.seek(0)
        assert _parse_journal(f.read())["MESSAGE"] == big


def test_journal_stream_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not logs.stderr_is_journal()  # stderr was redirected: plain text
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.stderr_is_journal()


@pytest.mark.parametrize(
    ("status", "oom", "want"),
    [
        (0, False, "status=0 cause=exit"),
        (3, False, "status=3 cause=exit"),
        (137, False, "status=137 cause=signal:SIGKILL"),
        (137, True, "status=137 cause=oom"),
        (143, True, "status=143 cause=signal:SIGTERM"),
        (None, False, "status=unknown cause=unknown"),
    ],
)
def test_exit_causes(status: int | None, oom: bool, want: str) -> None:
    assert logs.exit_detail(status, oom) == want


def test_lifecycle_line(caplog: pytest.LogCaptureFixture) -> None:
    c = SimpleNamespace(id="a" * 64, name="web", user_id="u1", status="stopped")
    with caplog.at_level(logging.INFO, logger="rexecd.lifecycle"):
        logs.lifecycle("exit", c, "status=137 cause=oom", user="alice")
    rec = caplog.records[-1]
    assert rec.getMessage() == (
        "container exit: web id=aaaaaaaaaaaa user=alice status=stopped status=137 cause=oom"
    )
    assert rec.CONTAINER_ID == "a" * 64 and rec.USER == "alice"  # type: ignore[attr-defined]
