"""Reads of what a tenant controls run on its container's own thread: a container
whose /etc/passwd read hangs holds up neither other containers nor the shared pool."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rexecd.models import ContainerRecord
from rexecd.runtime import containerroot
from rexecd.runtime.users import Identity
from rexecd.service.inside import CpuMeter, Inside
from rexecd.service.tenantthreads import TenantThreads
from tests.deadlines import scaled
from tests.unit.fakes.store import RES


async def test_a_blocked_container_thread_holds_up_no_one_else() -> None:
    threads = TenantThreads()
    release = threading.Event()
    try:
        stuck = asyncio.ensure_future(threads.run("a", release.wait, scaled(30)))
        other = await asyncio.wait_for(threads.run("b", lambda: "b done"), scaled(5))
        shared = await asyncio.wait_for(asyncio.to_thread(lambda: "pool free"), scaled(5))
        assert (other, shared) == ("b done", "pool free")
        assert not stuck.done()
    finally:
        release.set()
    assert await stuck is True
    threads.close_all()
    assert len(threads) == 0


async def test_exec_user_lookup_runs_on_the_containers_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, int, str]] = []

    def identity(pid: int, user: str) -> Identity:
        seen.append((threading.current_thread().name, pid, user))
        return Identity(uid=1000, gid=1000, additional_gids=[27], home="/home/user")

    monkeypatch.setattr(containerroot, "identity", identity)
    threads = TenantThreads()
    inside = Inside(*([None] * 7), threads, CpuMeter())  # type: ignore[arg-type]
    rec = ContainerRecord(
        user_id="u", name="a", image="busybox", status="running", pid=4321, resources=RES
    )
    try:
        ids = await inside._ids(rec, "alice")
    finally:
        threads.close_all()
    assert ids == (1000, 1000, [27])
    assert len(seen) == 1 and seen[0][1:] == (4321, "alice")
    assert seen[0][0].startswith("rexecd-tenant")
    # No user asked: the ids the container started with, nothing read.
    rec.spec = {"uid": 5, "gid": 6}
    assert await inside._ids(rec, None) == (5, 6, [])
    assert len(seen) == 1
