"""In-memory maps keyed by what clients choose (volume names, terminal session ids,
container ids) hold entries only while those are in use, never one per name ever seen."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

from rexecd.config import Config
from rexecd.errors import Conflict, QuotaExceeded
from rexecd.models import ContainerRecord, ContainerResources
from rexecd.runtime.storage import LoopStorage
from rexecd.service.interface import TerminalProcess
from rexecd.service.manager import ContainerManager
from rexecd.service.store import Store
from rexecd.service.terminals import TerminalRegistry


def test_keyed_locks_forget_keys_nobody_holds() -> None:
    from rexecd.runtime.storage.volume import KeyedLocks

    locks = KeyedLocks()
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with locks.hold("k"):
            inside.set()
            release.wait(5)
            order.append("first")

    def second() -> None:
        with locks.hold("k"):
            order.append("second")

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(5)
    t2 = threading.Thread(target=second)
    t2.start()
    with locks.hold("other"):
        assert len(locks) == 2
    release.set()
    t1.join(5)
    t2.join(5)
    assert order == ["first", "second"]  # still one lock per key while in use
    assert len(locks) == 0


def test_loop_storage_keeps_no_lock_per_volume_name(tmp_path: Path) -> None:
    storage = LoopStorage(tmp_path / "state", tmp_path / "run")
    for i in range(50):
        storage.destroy("u1", f"name-{i}")  # none exists: nothing to do, but locked
    assert len(storage._locks) == 0


async def _open_all(reg: TerminalRegistry, ids: list[str]) -> list[object]:
    """Open every id at once against a stopped container (each start fails once all
    have begun); what each open raised."""
    gate = asyncio.Event()

    async def refused() -> TerminalProcess:
        await gate.wait()
        raise Conflict("container is not running")

    tasks = [asyncio.ensure_future(reg.open("db", i, False, refused)) for i in ids]
    await asyncio.sleep(0)
    gate.set()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def test_terminal_open_keeps_no_lock_per_session_id() -> None:
    # Room for every opener: this is about the locks, not the session cap.
    reg = TerminalRegistry(65536, 60.0, max_sessions=100)
    # Session ids are the client's choice: a stream of new ids to a stopped container.
    results = await _open_all(reg, [f"s{i % 50}" for i in range(100)])
    assert all(isinstance(r, Conflict) for r in results)
    assert reg._opening == {}
    assert reg._starting == {}


async def test_terminal_opens_past_the_cap_are_refused_while_others_start() -> None:
    reg = TerminalRegistry(65536, 60.0, max_sessions=3)
    results = await _open_all(reg, [f"s{i}" for i in range(10)])
    # Three got as far as starting a shell; the rest were refused while those started.
    assert sum(isinstance(r, Conflict) for r in results) == 3
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 7
    assert reg._starting == {} and reg._opening == {}


class _Cgroup:
    def __init__(self) -> None:
        self.fd = os.eventfd(0)

    def oom_fd(self) -> int:
        return self.fd

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(oom_kills=0)


async def test_watch_state_of_a_container_goes_when_it_stops(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path / "state")
    runtime = SimpleNamespace(cgroup=lambda cid: _Cgroup())
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with Store(cfg.state_dir) as store:
            manager = ContainerManager(cfg, store, runtime, None)  # type: ignore[arg-type]
            rec = ContainerRecord(
                user_id="u",
                name="a",
                image="busybox",
                status="running",
                pid=proc.pid,
                resources=ContainerResources(
                    memory_mb=512, cpu_shares=1000, disk_mb=2048, network_mbps=10
                ),
            )
            watcher = manager.watcher
            for _ in range(3):  # three runs of one container
                watcher.watch(rec)
                manager.cpu.percent(rec.db_id, 100)  # what a stats call leaves
                await manager.threads.run(rec.db_id, int)  # what an exec's user lookup leaves
                assert rec.db_id in watcher.oom_seen
                watcher.unwatch(rec.db_id)
            leftovers = [
                table
                for table in (
                    watcher.inits,
                    watcher.oom_fds,
                    watcher.oom_seen,
                    manager.cpu.prev,
                )
                if rec.db_id in table
            ]
            assert leftovers == []
            assert len(manager.threads) == 0
    finally:
        proc.kill()
        proc.wait()
