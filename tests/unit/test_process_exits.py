"""ProcessExits: exit statuses awaited on the event loop (a pidfd, no thread per wait),
from the spawner's report or, when the daemon is the parent, from waitid. A fake
spawner stands in for the real one; the processes are the test's own children."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable
from typing import Any, cast

from rexecd.service.exits import ProcessExits


class FakeSpawner:
    """Reports exits like the real one: a table plus listeners called from a thread."""

    def __init__(self) -> None:
        self.exits: dict[int, int] = {}
        self.listeners: list[Callable[[int, int], None]] = []
        self.lock = threading.Lock()

    def add_exit_listener(self, fn: Callable[[int, int], None]) -> None:
        self.listeners.append(fn)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        assert timeout == 0, "ProcessExits must never block on the spawner"
        with self.lock:
            return self.exits.pop(pid, None)

    def report(self, pid: int, status: int) -> None:
        with self.lock:
            self.exits[pid] = status
        for fn in self.listeners:
            fn(pid, status)


class FakeRuntime:
    def __init__(self) -> None:
        self.spawner = FakeSpawner()


def exits_for(rt: FakeRuntime) -> ProcessExits:
    return ProcessExits(cast(Any, rt))


async def test_the_spawners_report_gives_the_status() -> None:
    rt = FakeRuntime()
    exits = exits_for(rt)
    # Still running, so only the report can end the wait (its status is made up so
    # that it cannot come from waitid).
    proc = subprocess.Popen(["sleep", "30"])
    try:
        waiting = asyncio.ensure_future(exits.wait(proc.pid, 10))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        reporter = threading.Thread(target=rt.spawner.report, args=(proc.pid, 42))
        reporter.start()
        assert await asyncio.wait_for(waiting, 10) == 42
        reporter.join()
        assert rt.spawner.exits == {}, "the status is taken out of the spawner's table"
    finally:
        proc.kill()
        proc.wait()


async def test_a_process_that_keeps_running_times_out_with_none() -> None:
    exits = exits_for(FakeRuntime())
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert await exits.wait(proc.pid, 0.2) is None
    finally:
        proc.kill()
        proc.wait()


async def test_a_process_re_parented_to_the_daemon_is_reaped_by_it() -> None:
    # The spawner died: nobody reports, but the process is our child now.
    exits = exits_for(FakeRuntime())
    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    assert await asyncio.wait_for(exits.wait(proc.pid, 10), 10) == 7
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    assert await asyncio.wait_for(exits.wait(killed.pid, 10), 10) == 128 + 9
