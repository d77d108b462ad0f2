"""Where the daemon's log lines go, and the lines an operator reads.

Under systemd (stderr is the journal stream named by ``JOURNAL_STREAM``) records are
sent in the journal's native protocol, written by hand over its datagram socket, with
structured fields: ``CONTAINER_ID``, ``USER`` and ``REQUEST_ID`` when a record carries
them, so ``journalctl CONTAINER_ID=...`` finds a container's whole story. Anywhere else
they are plain text lines on stderr. Either way the lines pass the token scrubber.

``lifecycle`` writes the one line per container event (create, start, stop, exit with
its cause, delete); the request id of the API call that caused it, if any, is taken
from a context variable set per request (``REQUEST_ID``).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import signal
import socket
import struct
import sys
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# The fields a record may carry (``extra={...}``), as the journal names them.
FIELDS = ("CONTAINER_ID", "USER", "REQUEST_ID")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rexecd_request_id", default=None
)
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]*\Z")
# syslog priorities by logging level
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

lifecycle_log = logging.getLogger("rexecd.lifecycle")


def _priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", errors="replace")
    if b"\n" in data:
        # Binary-safe form: NAME\n, 64-bit little-endian length, value, \n.
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Send records to journald's native socket, one datagram each.

    A record too large for a datagram goes in a sealed memfd passed over the socket, as
    sd_journal_send does.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "rexecd") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def payload(self, record: logging.LogRecord) -> bytes:
        """The datagram for ``record``: MESSAGE, PRIORITY and the structured fields."""
        parts = [
            _field("MESSAGE", self.format(record)),
            _field("PRIORITY", str(_priority(record.levelno))),
            _field("SYSLOG_IDENTIFIER", self.identifier),
            _field("LOGGER", record.name),
            _field("CODE_FILE", record.pathname or ""),
            _field("CODE_LINE", str(record.lineno)),
            _field("CODE_FUNC", record.funcName or ""),
        ]
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is None and name == "REQUEST_ID":
                value = REQUEST_ID.get()
            if value is not None and _FIELD_NAME.match(name):
                parts.append(_field(name, str(value)))
        return b"".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.payload(record)
            try:
                self._sock.sendto(data, self.path)
            except OSError as exc:
                if exc.errno not in (90, 105):  # EMSGSIZE, ENOBUFS
                    raise
                self._send_memfd(data)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("rexecd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            import fcntl

            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
            )
            # (socket.send_fds would drop the address: sendmsg itself.)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (``JOURNAL_STREAM=DEV:INO``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger: the journal under systemd, plain stderr lines otherwise.

    Like ``logging.basicConfig``, a no-op when the root logger has handlers already
    (an embedding program, or a test harness, configured logging itself).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler
    if stderr_is_journal() and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler()
        # The journal stamps time and level itself.
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)


def lifecycle(
    event: str, container: Any, detail: str | None = None, user: str | None = None
) -> None:
    """One line for a container lifecycle event: ``event`` (create, start, stop, exit,
    delete, ...), the container's name, id, user and status, and ``detail`` (the exit
    status and cause, or why it was stopped)."""
    cid = str(container.id)
    who = user or str(container.user_id)
    text = f"container {event}: {container.name} id={cid[:12]} user={who} status={container.status}"
    if detail:
        text += f" {detail}"
    lifecycle_log.info(text, extra={"CONTAINER_ID": cid, "USER": who})


def exit_detail(status: int | None, oom: bool) -> str:
    """``status=... cause=...`` for an init that exited: an OOM kill, a signal, or its
    own exit status. ``status`` is the shell's form (128+N for signal N)."""
    if status is None:
        return "status=unknown cause=unknown"
    if status > 128:
        sig = status - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        cause = "oom" if oom and sig == signal.SIGKILL else f"signal:{name}"
        return f"status={status} cause={cause}"
    return f"status={status} cause=exit"
