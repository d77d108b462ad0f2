#!/usr/bin/env python3
"""Fault benchmarks: zombies and stop times after spawner deaths and a daemon restart,
and how fast a flood of partial-header connections is closed.

Run as root:
  .venv/bin/python bench/faults.py reaping [--deaths 10] [--restarted 3]
  .venv/bin/python bench/faults.py slow-clients [--connections 1000] [--timeout 2]
  (``--no-http-config`` leaves the ``http`` section out: for a daemon without it)
Results: a summary on stdout and bench/results/faults-MODE.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.daemon import Daemon  # noqa: E402
from tests.integration.daemon_fixtures import (  # noqa: E402
    BUSYBOX_TAR,
    db_rows,
    kill_spawner,
    zombies_of,
)

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: rexecd\r\nUser-Agent: slow"


def _ms(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "n": len(samples),
    }


async def _running(s: aiohttp.ClientSession, d: Daemon, name: str) -> int:
    async with s.post(f"{d.url}/api/containers", json={"image": "busybox", "name": name}) as r:
        assert r.status == 202, await r.text()
        db_id = (await r.json())["db_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with s.get(f"{d.url}/api/containers/{name}") as r:
            if (await r.json())["status"] == "running":
                return int(db_rows(d, "SELECT pid FROM containers WHERE db_id = ?", db_id)[0][0])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} not running")


async def _stop_all(s: aiohttp.ClientSession, d: Daemon, names: list[str]) -> list[float]:
    took = []
    for name in names:
        t0 = time.perf_counter()
        async with s.post(f"{d.url}/api/containers/{name}/stop") as r:
            assert r.status == 200, await r.text()
        took.append(time.perf_counter() - t0)
    for name in names:
        async with s.delete(f"{d.url}/api/containers/{name}?volumes=true") as r:
            assert r.status == 200, await r.text()
    return took


async def reaping(d: Daemon, deaths: int, restarted: int) -> dict[str, Any]:
    assert d.proc is not None
    headers = {"Authorization": f"Bearer {d.token('bench-reap', tier='enterprise')}"}
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers=headers) as s:
        # A container, then its spawner killed under it: the next create starts a new one.
        names = [f"orphan-{i}" for i in range(deaths)]
        for name in names:
            await _running(s, d, name)
            kill_spawner(d)
        out["stop_readopted_after_spawner_death"] = _ms(await _stop_all(s, d, names))
        await asyncio.sleep(1.0)  # let anything that would be reaped be reaped
        out[f"zombies_of_daemon_after_{deaths}_spawner_deaths"] = len(zombies_of(d.proc.pid))
        names = [f"restart-{i}" for i in range(restarted)]
        for name in names:
            await _running(s, d, name)
    d.restart()
    async with aiohttp.ClientSession(headers=headers) as s:
        out["stop_readopted_after_daemon_restart"] = _ms(await _stop_all(s, d, names))
        names = [f"fresh-{i}" for i in range(deaths)]
        for name in names:
            await _running(s, d, name)
        out["stop_started_by_live_spawner"] = _ms(await _stop_all(s, d, names))
    return out


def slow_clients(d: Daemon, connections: int, timeout: float) -> dict[str, Any]:
    # Each source address stays well under the per-address cap.
    per_source = 16
    socks: list[socket.socket] = []
    opened: dict[socket.socket, float] = {}
    closed: list[float] = []
    sel = selectors.DefaultSelector()

    def notice_closes(wait: float) -> None:
        # Also while connecting: a close is timed when it is seen.
        for key, _ in sel.select(timeout=wait):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                gone = s.recv(4096) == b""
            except ConnectionResetError:
                gone = True
            except BlockingIOError:
                gone = False
            if gone:
                closed.append(time.monotonic() - opened[s])
                sel.unregister(s)

    try:
        for i in range(connections):
            src = f"127.0.{10 + i // per_source // 250}.{1 + i // per_source % 250}"
            s = socket.create_connection(("127.0.0.1", d.port), source_address=(src, 0))
            s.sendall(PARTIAL_HEAD)
            s.setblocking(False)
            opened[s] = time.monotonic()
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
            notice_closes(0)
        connected = time.monotonic() - min(opened.values())
        deadline = time.monotonic() + timeout + 60
        while len(closed) < connections and time.monotonic() < deadline:
            notice_closes(0.2)
        return {
            "connections": connections,
            "seconds_to_open_them": round(connected, 2),
            "header_timeout_s": timeout,
            "closed": len(closed),
            "still_open_after_s": round(timeout + 60, 1),
            "closed_after_s_min": round(min(closed), 3) if closed else None,
            "closed_after_s_max": round(max(closed), 3) if closed else None,
        }
    finally:
        sel.close()
        for s in socks:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["reaping", "slow-clients"])
    ap.add_argument("--deaths", type=int, default=10)
    ap.add_argument("--restarted", type=int, default=3)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--no-http-config", action="store_true")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rexecd-bench-"))
    overrides: dict[str, Any] = {"network": {"enabled": False}}
    if a.mode == "slow-clients" and not a.no_http_config:
        overrides["http"] = {"header_timeout_s": a.timeout}
    d = Daemon(base, overrides=overrides)
    try:
        d.import_image(BUSYBOX_TAR)
        d.start()
        if a.mode == "reaping":
            result = asyncio.run(reaping(d, a.deaths, a.restarted))
        else:
            result = slow_clients(d, a.connections, a.timeout)
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / f"faults-{a.mode}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
