"""Run a command to completion inside a container and collect its output (``POST /exec``).

Nothing here holds a thread while the command runs: its pipes are read and its exit
is awaited on the event loop (``ProcessExits``), so a thousand sleeping commands
cost file descriptors, not worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field

from rexecd.errors import ChildSetupError, InvalidRequest
from rexecd.models import ExecResult
from rexecd.runtime.container import Runtime
from rexecd.runtime.spec import ProcessSpec
from rexecd.service.exits import ProcessExits

# After the process exits, output still buffered in the pipes is collected for at most
# this long: a background child holding stdout open must not make the call hang.
DRAIN_AFTER_EXIT_S = 0.5
# How long a killed command's group may take to die before the answer goes without
# its status.
KILL_GRACE_S = 10.0


@dataclass
class _Sink:
    """One output pipe read without blocking; keeps at most ``cap`` bytes in total."""

    fd: int
    budget: list[int]
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    eof: asyncio.Event = field(default_factory=asyncio.Event)

    def on_readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.eof.set()
            return
        keep = min(len(chunk), self.budget[0])
        if keep < len(chunk):
            self.truncated = True  # keep reading so the writer never blocks on a full pipe
        self.data += chunk[:keep]
        self.budget[0] -= keep


def setup_failure(exc: ChildSetupError, process: ProcessSpec) -> tuple[int, str]:
    """A failed start as a shell reports it: ``(127 or 126, message)`` for a program
    that cannot be run; InvalidRequest for a bad workdir; else ``exc`` again."""
    if exc.step == "exec" and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
        code = 127 if exc.errno == errno.ENOENT else 126
        return code, f"exec {process.args[0]}: {os.strerror(exc.errno or 0)}\n"
    if exc.step == "chdir" and exc.errno in (
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EACCES,
        errno.ELOOP,  # a magic link (/proc/self/fd/N), refused
    ):
        # The caller's workdir, not a server fault.
        raise InvalidRequest(
            f"workdir {process.cwd}: {os.strerror(exc.errno or 0)}", workdir=process.cwd
        ) from None
    raise exc


async def run_exec(
    runtime: Runtime,
    exits: ProcessExits,
    cid: str,
    pid: int,
    process: ProcessSpec,
    timeout: float,
    cap: int,
    *,
    seccomp: str,
) -> tuple[int, ExecResult]:
    """``(200, result)`` when the command finished, ``(504, partial result)`` on timeout.
    ``seccomp`` is the container's seccomp profile, which the command runs under."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    # The child's ends must block: a program may not expect non-blocking stdio.
    os.set_blocking(out_w, True)
    os.set_blocking(err_w, True)
    # stdin is an empty pipe, not the host's /dev/null: a container's root could chmod
    # that device node of the host through /proc/self/fd/0.
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    os.close(stdin_w)
    budget = [cap]
    sinks = [_Sink(out_r, budget), _Sink(err_r, budget)]
    try:
        try:
            child, _ = await asyncio.to_thread(
                runtime.exec, cid, pid, process, [stdin_r, out_w, err_w], seccomp=seccomp
            )
        except ChildSetupError as exc:
            code, msg = setup_failure(exc, process)
            return 200, ExecResult(
                stdout="",
                stderr=msg,
                output=msg,
                exit_code=code,
                duration_ms=_ms(started),
                truncated=False,
            )
        finally:
            for fd in (out_w, err_w, stdin_r):
                os.close(fd)
        for s in sinks:
            loop.add_reader(s.fd, s.on_readable)
        try:
            status = await exits.wait(child.pid, timeout)
        except asyncio.CancelledError:
            # The caller is gone (client disconnect, daemon shutdown): nobody will read
            # the output, so the command does not outlive its request.
            _kill_group(child.pid)
            raise
        if status is None:
            _kill_group(child.pid)
            await exits.wait(child.pid, KILL_GRACE_S)
            await _drain(sinks, 0.2)
            return 504, _result(sinks, -1, started, error="command timed out")
        await _drain(sinks, DRAIN_AFTER_EXIT_S)
        return 200, _result(sinks, status, started)
    finally:
        for s in sinks:
            loop.remove_reader(s.fd)
            os.close(s.fd)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group the exec started (it called setsid)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


async def _drain(sinks: list[_Sink], limit: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(s.eof.wait() for s in sinks)), limit)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _result(sinks: list[_Sink], code: int, started: float, error: str | None = None) -> ExecResult:
    out = sinks[0].data.decode(errors="replace")
    err = sinks[1].data.decode(errors="replace")
    if error:
        err += ("" if not err or err.endswith("\n") else "\n") + error + "\n"
    return ExecResult(
        stdout=out,
        stderr=err,
        output=out + err,
        exit_code=code,
        duration_ms=_ms(started),
        truncated=sinks[0].truncated or sinks[1].truncated,
    )
