#!/usr/bin/env python3
"""Fairness benchmark: how fast another user's GET and /health answer while one user
holds 50 long execs and keeps 20 downloads of a FIFO going.

Before the fix each exec held a worker thread until its command ended, a FIFO download
held one forever, and authentication and /health queued behind them (a GET took 37 s
with six execs). Goals: the other user's GET p99 under 100 ms, /health p99 under 50 ms.

The hog's caps are raised (exec 64, file operations 32) so that all 50 execs run and
every FIFO read reaches the files code instead of a 429; with the default caps (16 and
4) the hog simply gets 429s sooner.

Run as root: .venv/bin/python bench/fairness.py [--execs 50] [--fifo-readers 20]
Results: a table on stdout and bench/results/fairness.json. Bounded: the load runs for
--seconds (default 20) and every loop stops with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import shutil
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
from tests.integration.daemon_fixtures import pids_with_cmdline  # noqa: E402

GOAL_GET_P99_MS = 100.0
GOAL_HEALTH_P99_MS = 50.0


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, int(len(s) * p))], 2)

    return {
        "n": len(s),
        "p50_ms": round(statistics.median(s), 2),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(s[-1], 2),
    }


async def timed(session: aiohttp.ClientSession, url: str, want: int = 200) -> float:
    t0 = time.perf_counter()
    async with session.get(url) as r:
        await r.read()
        if r.status != want:
            raise RuntimeError(f"GET {url}: {r.status}")
    return (time.perf_counter() - t0) * 1000


async def create_running(s: aiohttp.ClientSession, url: str, name: str) -> None:
    async with s.post(f"{url}/api/containers", json={"image": "busybox", "name": name}) as r:
        if r.status != 202:
            raise RuntimeError(f"create {name}: {r.status} {await r.text()}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with s.get(f"{url}/api/containers/{name}") as r:
            status = (await r.json())["status"]
        if status == "running":
            return
        if status == "error":
            raise RuntimeError(f"{name} failed to start")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} not running after 60 s")


async def sh(s: aiohttp.ClientSession, url: str, name: str, command: str) -> None:
    async with s.post(f"{url}/api/containers/{name}/exec", json={"command": command}) as r:
        body = await r.json()
        if r.status != 200 or body["exit_code"] != 0:
            raise RuntimeError(f"{command}: {r.status} {body}")


async def measure(
    other: aiohttp.ClientSession, url: str, name: str, seconds: float
) -> dict[str, list[float]]:
    """The other user's GET of its container and /health, one after another, for
    ``seconds``."""
    gets: list[float] = []
    health: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(gets) < 5000:
        gets.append(await timed(other, f"{url}/api/containers/{name}"))
        health.append(await timed(other, f"{url}/health"))
        await asyncio.sleep(0.02)
    return {"get": gets, "health": health}


async def hog_load(
    url: str, token: str, box: str, args: argparse.Namespace, ready: Any, stop: Any
) -> Any:
    """The hog, in a process of its own so that its client work does not slow the
    measuring client: ``args.execs`` long execs, then ``args.fifo_readers`` FIFO
    downloads re-sent as each answers; ``ready`` once all run, until ``stop`` (both
    multiprocessing Events)."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"},
        connector=conn,
        timeout=aiohttp.ClientTimeout(total=600),
    ) as hog:
        marker = f"{secrets.randbelow(10**6) + 10**6}.5"
        execs = [
            asyncio.ensure_future(
                hog.post(
                    f"{url}/api/containers/{box}/exec",
                    json={"command": f"sleep {marker}", "timeout_seconds": 300},
                )
            )
            for _ in range(args.execs)
        ]
        deadline = time.monotonic() + 120
        while len(pids_with_cmdline(f"sleep\0{marker}".encode())) < args.execs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args.execs} execs not running after 120 s")
            await asyncio.sleep(0.1)
        answers: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(loop.run_in_executor(None, stop.wait))

        async def fifo_reader() -> None:
            while not stopped.done():
                async with hog.get(
                    f"{url}/api/containers/{box}/files", params={"path": "/home/user/pipe"}
                ) as r:
                    await r.read()
                    answers[str(r.status)] = answers.get(str(r.status), 0) + 1

        readers = [asyncio.ensure_future(fifo_reader()) for _ in range(args.fifo_readers)]
        ready.set()
        await asyncio.gather(*readers)
        running = len(pids_with_cmdline(f"sleep\0{marker}".encode()))
        async with hog.post(f"{url}/api/containers/{box}/stop", params={"timeout": "0"}):
            pass
        for r in await asyncio.gather(*execs, return_exceptions=True):
            if isinstance(r, aiohttp.ClientResponse):
                r.release()
        return {"execs_running": running, "fifo_answers": dict(sorted(answers.items()))}


def hog_process(
    url: str, token: str, box: str, args: argparse.Namespace, ready: Any, stop: Any, out: Any
) -> None:
    out.put(asyncio.run(hog_load(url, token, box, args, ready, stop)))


async def run(d: Daemon, hog_token: str, other_token: str, args: argparse.Namespace) -> Any:
    url = d.url
    hog_box, other_box = f"hog-{secrets.token_hex(3)}", f"calm-{secrets.token_hex(3)}"
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {hog_token}"}, timeout=timeout
        ) as hog,
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {other_token}"}, timeout=timeout
        ) as other,
    ):
        await create_running(hog, url, hog_box)
        await create_running(other, url, other_box)
        await sh(hog, url, hog_box, "mkfifo /home/user/pipe")
        out: dict[str, Any] = {}
        out["idle"] = {k: summary(v) for k, v in (await measure(other, url, other_box, 3)).items()}

        ctx = multiprocessing.get_context("spawn")
        ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(
            target=hog_process, args=(url, hog_token, hog_box, args, ready, stop, results)
        )
        proc.start()
        loop = asyncio.get_running_loop()
        try:
            if not await loop.run_in_executor(None, ready.wait, 150):
                raise RuntimeError("the hog's execs did not all start")
            loaded = await measure(other, url, other_box, args.seconds)
        finally:
            stop.set()
        out["loaded"] = {k: summary(v) for k, v in loaded.items()}
        hog_out = await loop.run_in_executor(None, results.get, True, 300)
        proc.join(60)
        out["hog_execs_running"] = hog_out["execs_running"]
        out["hog_fifo_answers"] = hog_out["fifo_answers"]
        for s, box in ((hog, hog_box), (other, other_box)):
            async with s.delete(f"{url}/api/containers/{box}?volumes=true"):
                pass
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--execs", type=int, default=50)
    ap.add_argument("--fifo-readers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    base = Path(tempfile.mkdtemp(prefix="rexecd-bench-fair-", dir="/var/tmp"))
    d = Daemon(
        base,
        overrides={
            "concurrency": {"exec_per_user": 64, "file_ops_per_user": 32},
            "rate_limits": {"create_per_min": 1000, "ops_per_min": 100000, "read_per_min": 100000},
        },
    )
    try:
        d.import_image(ROOT / "build" / "test-images" / "busybox.tar")
        hog_token = d.token("hog")
        other_token = d.token("other")
        d.start()
        results = asyncio.run(run(d, hog_token, other_token, args))
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)
    results["goals"] = {
        "other_user_get_p99_ms": GOAL_GET_P99_MS,
        "health_p99_ms": GOAL_HEALTH_P99_MS,
        "met": results["loaded"]["get"]["p99_ms"] < GOAL_GET_P99_MS
        and results["loaded"]["health"]["p99_ms"] < GOAL_HEALTH_P99_MS,
    }
    print(
        f"hog: {results['hog_execs_running']} execs running, FIFO reads answered:",
        results["hog_fifo_answers"],
    )
    print(f"{'':28} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in ("idle", "loaded"):
        for what, label in (("get", "other user's GET"), ("health", "/health")):
            r = results[phase][what]
            print(
                f"{phase + ': ' + label:28} {r['n']:>6} {r['p50_ms']:>8} {r['p95_ms']:>8} "
                f"{r['p99_ms']:>8} {r['max_ms']:>8}"
            )
    print("goals met" if results["goals"]["met"] else "GOALS MISSED", results["goals"])
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / "fairness.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
