"""The init guard continues a stopped process through its pidfd and records it; a
running one is left alone. Uses a child process of the test (no root)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rexecd.runtime import procinfo
from rexecd.service.initguard import InitGuard
from tests.deadlines import scaled


class FakeStore:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def append_event(self, type: str, payload: dict[str, Any], **kw: Any) -> int:
        self.events.append((type, payload, kw))
        return len(self.events)


@pytest.fixture
def child() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        yield proc.pid, pidfd
    finally:
        os.close(pidfd)
        proc.kill()
        proc.wait()


def wait_state(pid: int, want: set[str]) -> str:
    deadline = time.monotonic() + scaled(10)
    while (state := procinfo.state(pid)) not in want:
        assert time.monotonic() < deadline, f"pid {pid} still {state}, not {want}"
        time.sleep(0.01)
    assert state is not None
    return state


async def test_stopped_process_is_continued_and_recorded(child: tuple[int, int]) -> None:
    pid, pidfd = child
    store = FakeStore()
    guard = InitGuard(store, interval=0.01)  # type: ignore[arg-type]
    guard.watch("db1", pid, pidfd, "box", "u1")
    assert guard.check() == []  # running: nothing to do
    task = asyncio.ensure_future(guard.run())
    try:
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + scaled(10)
        while not store.events:
            assert time.monotonic() < deadline, "the guard recorded nothing"
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    wait_state(pid, {"S", "R"})
    kind, payload, kw = store.events[0]
    assert (kind, payload) == ("init_resumed", {"name": "box", "pid": pid})
    assert (kw["user_id"], kw["container_db_id"]) == ("u1", "db1")


async def test_forgotten_process_is_left_alone(child: tuple[int, int]) -> None:
    pid, pidfd = child
    guard = InitGuard(FakeStore())  # type: ignore[arg-type]
    guard.watch("db1", pid, pidfd, "box", "u1")
    guard.forget("db1")
    os.kill(pid, signal.SIGSTOP)
    wait_state(pid, {"T"})
    assert guard.check() == []
    assert procinfo.state(pid) == "T"
    os.kill(pid, signal.SIGCONT)


def test_state_of_a_gone_process_is_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procinfo.state(proc.pid) is None
    assert procinfo.state(os.getpid()) in ("R", "S")
