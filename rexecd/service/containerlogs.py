"""Container logs: ``<state_dir>/logs/<container id>.log``, the output of a container's
init (its stdout and stderr) and of its role install, bounded to its tail.

The init writes into a pipe that it also holds open for reading (the write end
reopened read-write through /proc): with a reader always there its writes never
raise EPIPE, even while the daemon is down (they block once the pipe's 64 KiB are
full, and go on when a daemon reads again; a restarted daemon reopens the pipe
through ``/proc/<init>/fd/1``). It is an anonymous pipe, not a named FIFO, so the
container holds no descriptor of a host file. The daemon reads it on the event loop
without blocking and hands the bytes to one writer thread of its own (never the
shared pool), through a bounded queue: output past what the disk takes is dropped,
with a note, instead of queueing without limit or stalling the loop. The writer keeps
each file at most ``max_bytes`` by cutting off its head; other writers of the same
file (role installs) append with O_APPEND, which the in-place cut keeps correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

READ_CHUNK = 65536
# Chunks waiting for the writer thread (at most 64 KiB each).
QUEUE_CHUNKS = 64
# What is kept of a log that grew past its cap: room to grow again before the next cut.
KEEP_FRACTION = 0.75
# Followers also look at the file this often, for writers outside this process.
FOLLOW_POLL_S = 1.0


class ContainerLogs:
    """Every container's log file and capture pipe; ``watch`` and ``unwatch`` run on
    the event loop, the rest from any thread."""

    def __init__(self, state_dir: Path, max_bytes: int) -> None:
        self.dir = state_dir / "logs"
        self.max_bytes = max_bytes
        self._queue: queue.Queue[tuple[str, bytes | None]] = queue.Queue(QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # The daemon's read end of a capture pipe, between open_capture and watch.
        self._opened: dict[str, int] = {}
        self._readers: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        # Bytes cut off the head of each log, so a follower's offset can move with them.
        self.trimmed: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def path(self, cid: str) -> Path:
        return self.dir / f"{cid}.log"

    # ------------------------------------------------------------ capture

    def open_capture(self, cid: str) -> list[int]:
        """Stdio for a starting init: an empty stdin, and stdout and stderr into the
        log's pipe. The caller closes the fds once the init has them."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.drop_capture(cid)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            # Read-write, so the init is a reader of its own pipe too (see above).
            out = os.open(f"/proc/self/fd/{w}", os.O_RDWR | os.O_CLOEXEC)
        finally:
            os.close(w)
        # stdin: a pipe whose writer is gone (EOF), not a host device node.
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        os.close(stdin_w)
        self._opened[cid] = r
        return [stdin_r, out, out]

    def drop_capture(self, cid: str) -> None:
        """Forget a capture whose init never ran (a failed start)."""
        fd = self._opened.pop(cid, None)
        if fd is not None:
            os.close(fd)

    def watch(self, cid: str, pid: int) -> None:
        """Read the init's pipe: the one just made, or (after a daemon restart) the one
        init ``pid`` holds as its stdout."""
        if cid in self._readers:
            return
        self._loop = asyncio.get_running_loop()
        fd = self._opened.pop(cid, None)
        if fd is None:
            fd = _reopen_pipe(f"/proc/{pid}/fd/1")
            if fd is None:
                return  # started before logs were captured: nothing to read
        os.set_blocking(fd, False)
        self._readers[cid] = fd
        self._loop.add_reader(fd, self._readable, cid, fd)

    def _readable(self, cid: str, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # Every writer is gone (the init and what it started): nothing more comes.
            self._close_reader(cid)
            return
        self.append(cid, data)

    def unwatch(self, cid: str) -> None:
        """The init exited: take what is left in the pipe, then stop reading it."""
        fd = self._readers.get(cid)
        if fd is not None:
            with contextlib.suppress(OSError):
                while data := os.read(fd, READ_CHUNK):
                    self.append(cid, data)
            self._close_reader(cid)
        self.drop_capture(cid)

    def _close_reader(self, cid: str) -> None:
        fd = self._readers.pop(cid, None)
        if fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for cid in list(self._readers):
            self._close_reader(cid)

    # ------------------------------------------------------------ writing

    def append(self, cid: str, data: bytes) -> None:
        """Queue ``data`` for the log; dropped (and counted) if the writer is behind."""
        self._ensure_writer()
        dropped = self._dropped.pop(cid, 0)
        note = f"\n[rexecd: {dropped} bytes of output dropped]\n".encode() if dropped else b""
        try:
            self._queue.put_nowait((cid, note + data))
        except queue.Full:
            self._dropped[cid] = dropped + len(data)

    def remove(self, cid: str) -> None:
        """Delete the log (the container is deleted), after what is queued for it."""
        self._ensure_writer()
        self._queue.put((cid, None))

    def _ensure_writer(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_loop, name="rexecd-logs", daemon=True
                )
                self._thread.start()

    def _write_loop(self) -> None:
        while True:
            cid, data = self._queue.get()
            try:
                if data is None:
                    with contextlib.suppress(FileNotFoundError):
                        self.path(cid).unlink()
                    self.trimmed.pop(cid, None)
                else:
                    self._write(cid, data)
            except OSError as exc:
                log.warning("container log %s: %s", cid, exc)
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._wake, cid)

    def _write(self, cid: str, data: bytes) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(
            self.path(cid), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, data)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.max_bytes:
            self.trimmed[cid] = self.trimmed.get(cid, 0) + trim(
                self.path(cid), int(self.max_bytes * KEEP_FRACTION)
            )

    # ------------------------------------------------------------ reading

    def _wake(self, cid: str) -> None:
        for ev in self._waiters.get(cid, ()):
            ev.set()

    async def follow(
        self, cid: str, follow: bool, alive: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[bytes]:
        """The log from its start; with ``follow``, then what is added, until
        ``await alive()`` is false and nothing more came."""
        self._loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        self._waiters.setdefault(cid, set()).add(ev)
        offset = 0
        seen_trim = self.trimmed.get(cid, 0)
        try:
            while True:
                ev.clear()
                trimmed = self.trimmed.get(cid, 0)
                offset = max(0, offset - (trimmed - seen_trim))
                seen_trim = trimmed
                chunk = await asyncio.to_thread(_read_from, self.path(cid), offset)
                if chunk:
                    offset += len(chunk)
                    yield chunk
                    continue
                if not follow or not await alive():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), FOLLOW_POLL_S)
        finally:
            waiters = self._waiters.get(cid)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[cid]


def _reopen_pipe(path: str) -> int | None:
    """A read end of the pipe at ``path`` (a /proc fd link), or None when it is not a
    pipe: looked at through O_PATH first, so nothing else is ever opened for reading."""
    try:
        probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISFIFO(os.fstat(probe).st_mode):
            return None
        return os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(probe)


def _read_from(path: Path, offset: int, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def trim(path: Path, keep: int) -> int:
    """Cut ``path`` down to about its last ``keep`` bytes, from a line start when one
    is near; in place, so appenders with O_APPEND go on at the new end. Returns how
    many bytes went."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size <= keep:
            return 0
        f.seek(size - keep)
        tail = f.read()
        nl = tail.find(b"\n", 0, 4096)
        if nl >= 0:
            tail = tail[nl + 1 :]
        f.seek(0)
        f.write(tail)
        f.truncate(len(tail))
        return size - len(tail)

