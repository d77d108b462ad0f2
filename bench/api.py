#!/usr/bin/env python3
"""API benchmark: create->running latency through the REST API (SSE stream until
"ready") and GET /containers throughput with 100 containers, side by side in the same
run with `podman run -d` / `podman ps` on the same image when podman is installed.

Run as root: .venv/bin/python bench/api.py [--creates 30] [--containers 100]
Results: a table on stdout and bench/results/api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.podman_env import PodmanEnv  # noqa: E402
from tests.integration.daemon import Daemon  # noqa: E402

BIG_TIER = {
    "cpu_millicores": 8000,
    "memory_mb": 8192,
    "disk_mb": 51200,
    "containers": 500,
    "session_hours": None,
    "network_mbps": 1000,
}


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_ms": round(statistics.median(s), 2),
        "p95_ms": round(s[max(0, int(len(s) * 0.95) - 1)], 2),
        "n": len(s),
    }


async def create_ready(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    """Milliseconds from POST /containers/stream to its ``ready`` frame."""
    t0 = time.perf_counter()
    async with session.post(f"{url}/api/containers/stream", json=body) as r:
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            frame = json.loads(line[5:])
            if frame.get("error"):
                raise RuntimeError(f"create failed: {frame}")
            if frame.get("complete"):
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("stream ended before ready")


async def rexecd_bench(
    d: Daemon, token: str, creates: int, containers: int, mode: str
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers=headers) as s:
        lat = []
        for i in range(creates + 3):
            ms = await create_ready(
                s, d.url, {"image": "busybox", "name": f"lat-{mode}-{i}", "network_mode": mode}
            )
            if i >= 3:
                lat.append(ms)
        out["create_to_running"] = stats(lat)
        for i in range(creates + 3):
            async with s.delete(f"{d.url}/api/containers/lat-{mode}-{i}") as r:
                assert r.status == 200, await r.text()
        if containers:
            sem = asyncio.Semaphore(4)

            async def one(i: int) -> None:
                async with sem:
                    await create_ready(
                        s, d.url, {"image": "busybox", "name": f"many-{i}", "network_mode": mode}
                    )

            await asyncio.gather(*(one(i) for i in range(containers)))
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 3.0:
                async with s.get(f"{d.url}/api/containers") as r:
                    body = await r.json()
                    assert body["count"] == containers
                n += 1
            elapsed = time.perf_counter() - t0
            out["list_100"] = {
                "requests_per_s": round(n / elapsed, 1),
                "ms_per_request": round(elapsed / n * 1000, 2),
            }
            for i in range(containers):
                async with s.delete(f"{d.url}/api/containers/many-{i}") as r:
                    assert r.status == 200
    return out


def podman_bench(image: Path, creates: int, containers: int) -> dict[str, Any] | str:
    try:
        pm = PodmanEnv()
    except RuntimeError as exc:
        return str(exc)
    try:
        pm.run("load", "-i", str(image))
        lat = []
        for i in range(creates + 3):
            t0 = time.perf_counter()
            pm.run(
                "run",
                "-d",
                "--network",
                "none",
                "--name",
                f"lat{i}",
                "busybox:latest",
                "sleep",
                "1000",
            )
            ms = (time.perf_counter() - t0) * 1000
            if i >= 3:
                lat.append(ms)
        pm.run("rm", "-f", "-t", "0", *[f"lat{i}" for i in range(creates + 3)])
        out: dict[str, Any] = {"create_to_running": stats(lat)}
        if containers:
            for i in range(containers):
                pm.run(
                    "run",
                    "-d",
                    "--network",
                    "none",
                    "--name",
                    f"many{i}",
                    "busybox:latest",
                    "sleep",
                    "1000",
                )
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 3.0:
                r = pm.run("ps", "--format", "json")
                assert len(json.loads(r.stdout)) == containers
                n += 1
            elapsed = time.perf_counter() - t0
            out["list_100"] = {
                "requests_per_s": round(n / elapsed, 1),
                "ms_per_request": round(elapsed / n * 1000, 2),
            }
        return out
    except subprocess.CalledProcessError as exc:
        return f"podman failed: {exc.stderr.strip()[-400:]}"
    finally:
        pm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--creates", type=int, default=30)
    ap.add_argument("--containers", type=int, default=100)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    image = ROOT / "build" / "test-images" / "busybox.tar"
    base = Path(tempfile.mkdtemp(prefix="rexecd-bench-api-", dir="/var/tmp"))
    d = Daemon(base, overrides={"tiers": {"enterprise": BIG_TIER}})
    results: dict[str, Any] = {}
    try:
        d.import_image(image)
        token = d.token("bench", tier="enterprise")
        d.start()
        results["rexecd (network none)"] = asyncio.run(
            rexecd_bench(d, token, args.creates, args.containers, "none")
        )
        results["rexecd (bridged, shaped)"] = asyncio.run(
            rexecd_bench(d, token, args.creates, 0, "default")
        )
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)
    results["podman run -d (runc, network none)"] = podman_bench(
        image, args.creates, args.containers
    )
    pod = results["podman run -d (runc, network none)"]
    pod_ms = pod["create_to_running"]["median_ms"] if isinstance(pod, dict) else None
    print(
        f"{'':40} {'create->running median':>24} {'p95':>8} {'x faster':>9} {'GET list req/s':>15}"
    )
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:40} {r}")
            continue
        c = r["create_to_running"]
        speed = round(pod_ms / c["median_ms"], 1) if pod_ms and "podman" not in name else "-"
        c["times_faster_than_podman"] = speed
        lst = r.get("list_100", {}).get("requests_per_s", "-")
        print(f"{name:40} {c['median_ms']:>24} {c['p95_ms']:>8} {speed:>9} {lst:>15}")
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / "api.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
