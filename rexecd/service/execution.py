"""Run a command to completion inside a container and collect its output (``POST /exec``)."""

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

# After the process exits, output still buffered in the pipes is collected for at most
# this long: a background child holding stdout open must not make the call hang.
DRAIN_AFTER_EXIT_S = 0.5


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


async def run_exec(
    runtime: Runtime,
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
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    budget = [cap]
    sinks = [_Sink(out_r, budget), _Sink(err_r, budget)]
    try:
        try:
            child, _ = await asyncio.to_thread(
                runtime.exec, cid, pid, process, [devnull, out_w, err_w], seccomp=seccomp
            )
        except ChildSetupError as exc:
            if exc.step == "exec" and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
                code = 127 if exc.errno == errno.ENOENT else 126
                msg = f"exec {process.args[0]}: {os.strerror(exc.errno or 0)}\n"
                return 200, ExecResult(
                    stdout="",
                    stderr=msg,
                    output=msg,
                    exit_code=code,
                    duration_ms=_ms(started),
                    truncated=False,
                )
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
            raise
        finally:
            for fd in (out_w, err_w, devnull):
                os.close(fd)
        for s in sinks:
            loop.add_reader(s.fd, s.on_readable)
        waiter = asyncio.ensure_future(asyncio.to_thread(runtime.spawner.wait, child.pid, timeout))
        status: int | None = None
        try:
            status = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            status = None
        if status is None:
            # Kill the whole process group the exec started (it called setsid).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await waiter
            await _drain(sinks, 0.2)
            return 504, _result(sinks, -1, started, error="command timed out")
        await _drain(sinks, DRAIN_AFTER_EXIT_S)
        return 200, _result(sinks, status, started)
    finally:
        for s in sinks:
            loop.remove_reader(s.fd)
            os.close(s.fd)


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
