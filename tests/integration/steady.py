"""Steady state of a real daemon: create/exec/terminal/delete cycles, and the daemon's
and spawner's descriptors, mounts, threads and RSS sampled along the way.

Shared by tests/integration/test_daemon_steady.py (a short run) and bench/steady.py
(the 200-cycle run); neither needs anything but a started ``Daemon`` and a token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, spawner_pid, unique
from tests.integration.terminal_client import terminal

# What may differ between the first and the last sample without counting as growth:
# an fd or thread that aiohttp, sqlite or the executor opens on first use of a path
# a warm-up cycle did not take. Mounts have none: every one belongs to a container.
SLACK = {"daemon_fds": 4, "spawner_fds": 2, "daemon_threads": 3, "spawner_threads": 0}
MOUNT_KEYS = ("daemon_mounts", "spawner_mounts", "host_mounts")


@dataclass
class Sample:
    cycle: int
    seconds: float
    daemon_fds: int
    daemon_threads: int
    daemon_rss_kib: int
    daemon_mounts: int
    spawner_fds: int
    spawner_threads: int
    spawner_mounts: int
    host_mounts: int
    host_mounts_all: int  # every mount on the host: other daemons' too, not checked

    def row(self) -> dict[str, float]:
        return asdict(self)


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _lines(path: str, needles: tuple[str, ...] = ()) -> int:
    with open(path) as f:
        return sum(1 for line in f if not needles or any(n in line for n in needles))


def sample(d: Daemon, cycle: int, started: float) -> Sample:
    assert d.proc is not None
    dpid, spid = d.proc.pid, spawner_pid(d)
    # Only this daemon's mounts are counted: other daemons on the host (the daemon
    # shares the host's mount namespace) come and go meanwhile.
    mine = (f"{d.base}/", f"{d.run}/", f"{d.base} ", f"{d.run} ")
    return Sample(
        cycle=cycle,
        seconds=round(time.monotonic() - started, 1),
        daemon_fds=len(list(Path(f"/proc/{dpid}/fd").iterdir())),
        daemon_threads=_status(dpid, "Threads"),
        daemon_rss_kib=_status(dpid, "VmRSS"),
        daemon_mounts=_lines(f"/proc/{dpid}/mountinfo", mine),
        spawner_fds=len(list(Path(f"/proc/{spid}/fd").iterdir())),
        spawner_threads=_status(spid, "Threads"),
        spawner_mounts=_lines(f"/proc/{spid}/mountinfo", mine),
        host_mounts=_lines("/proc/1/mountinfo", mine),
        host_mounts_all=_lines("/proc/1/mountinfo"),
    )


async def cycle(c: ApiClient, d: Daemon, token: str) -> None:
    """One container's life: create, exec, a terminal command, close, delete."""
    name = unique("steady")
    body = await c.create_running(name)
    try:
        out = await c.sh(body["id"], "echo exec-ok")
        assert out == "exec-ok\n", out
        async with terminal(d, token, name, id="steady") as t:
            assert await t.run("echo term-ok") == "term-ok\r\n"
    finally:
        await c.remove(name)


async def run(
    d: Daemon,
    token: str,
    cycles: int,
    every: int,
    warmup: int = 2,
    report: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """``warmup`` unsampled cycles, then ``cycles`` sampled every ``every`` (and after
    the last one). Returns the samples, the first one taken before cycle 1."""
    samples: list[Sample] = []
    started = time.monotonic()

    def take(i: int) -> None:
        s = sample(d, i, started)
        samples.append(s)
        if report is not None:
            report(s)

    async with ApiClient(d, token) as c:
        for _ in range(warmup):
            await cycle(c, d, token)
        take(0)
        for i in range(1, cycles + 1):
            await cycle(c, d, token)
            if i % every == 0 or i == cycles:
                take(i)
    return samples


def growth(first: Sample, last: Sample) -> dict[str, tuple[int, int]]:
    """The counts that grew past their slack: name -> (first, last)."""
    out = {}
    for key, slack in [*SLACK.items(), *((k, 0) for k in MOUNT_KEYS)]:
        a, b = getattr(first, key), getattr(last, key)
        if b - a > slack:
            out[key] = (a, b)
    return out
