#!/usr/bin/env python3
"""Growth benchmark: N create/delete cycles against a daemon, and what it keeps.

Each cycle creates a container under a new name (so each one makes a new /home/user
volume), waits until it runs, and deletes it keeping its volume, the way a user who
never cleans up would. Every ``--every`` cycles it prints what the daemon holds:
event rows and the other tables, kept volumes (on disk and their apparent size),
per-container dirs, loop devices, cgroups, and the daemon's RSS and open fds. Bounded
state levels off; unbounded state climbs with the cycle count.

Run as root: .venv/bin/python bench/growth.py [--cycles 1000] [--events-max-rows N]
Results: the table on stdout and bench/results/growth.json. ``--events-max-rows`` and
the other retention options are written to the daemon's config only when given, so the
script also runs against a daemon that predates them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import create_ready  # noqa: E402
from tests.integration.daemon import Daemon  # noqa: E402

TABLES = ("events", "containers", "volumes", "tokens", "ip_leases", "port_forwards")


def _count(path: Path, pattern: str = "*") -> int:
    return sum(1 for _ in path.glob(pattern)) if path.is_dir() else 0


def _proc(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open fds) of ``pid``."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _loop_devices(state: Path) -> int:
    n = 0
    for d in Path("/sys/block").glob("loop*"):
        try:
            if (d / "loop" / "backing_file").read_text().startswith(str(state)):
                n += 1
        except OSError:
            continue
    return n


def _cgroups(d: Daemon) -> int:
    for base in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        parent = base / d.cgroup_parent
        if parent.is_dir():
            return sum(1 for p in parent.iterdir() if p.is_dir())
    return 0


def snapshot(d: Daemon, user_id: str, cycle: int) -> dict[str, Any]:
    state = d.state.resolve()
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        max_seq = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    finally:
        db.close()
    images = list((state / "volumes" / user_id).glob("*.img"))
    assert d.proc is not None
    rss, fds = _proc(d.proc.pid)
    return {
        "cycle": cycle,
        "rows": rows,
        "events_appended": max_seq,
        "volumes": len(images),
        "volumes_apparent_mb": sum(p.stat().st_size for p in images) // (1024 * 1024),
        "db_kb": sum(p.stat().st_size for p in state.glob("state.db*")) // 1024,
        "state_container_dirs": _count(state / "containers"),
        "run_container_dirs": _count(d.run / "containers"),
        "volume_mounts": _count(d.run / "volumes" / user_id),
        "loop_devices": _loop_devices(state),
        "cgroups": _cgroups(d),
        "daemon_rss_kb": rss,
        "daemon_fds": fds,
    }


def show(s: dict[str, Any]) -> None:
    r = s["rows"]
    print(
        f"{s['cycle']:>6} {r['events']:>7} {s['events_appended']:>8} {r['containers']:>5} "
        f"{r['volumes']:>5} {s['volumes']:>5} {s['volumes_apparent_mb']:>7} {r['tokens']:>5} "
        f"{s['db_kb']:>6} {s['state_container_dirs']:>5} {s['run_container_dirs']:>5} "
        f"{s['loop_devices']:>5} {s['cgroups']:>5} {s['daemon_rss_kb']:>8} {s['daemon_fds']:>5}",
        flush=True,
    )


HEADER = (
    f"{'cycle':>6} {'events':>7} {'appended':>8} {'ctrs':>5} {'volrw':>5} {'vols':>5} "
    f"{'vol MB':>7} {'toks':>5} {'db KB':>6} {'sdirs':>5} {'rdirs':>5} {'loops':>5} "
    f"{'cgrps':>5} {'RSS KB':>8} {'fds':>5}"
)


async def run(d: Daemon, token: str, cycles: int, every: int, deadline: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    samples = []
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(f"{d.url}/api/tokens/validate") as r:
            user_id = (await r.json())["user_id"]
        print(HEADER)
        samples.append(snapshot(d, user_id, 0))
        show(samples[-1])
        done = 0
        t0 = time.monotonic()
        for i in range(1, cycles + 1):
            if time.monotonic() > deadline:
                print(f"stopped at the time limit after {done} cycles", flush=True)
                break
            name = f"g{i}"
            body = {"image": "busybox", "name": name, "network_mode": "none", "disk_mb": 32}
            await create_ready(s, d.url, body)
            async with s.delete(f"{d.url}/api/containers/{name}") as r:
                assert r.status == 200, await r.text()
            done = i
            if i % every == 0 or i == cycles:
                samples.append(snapshot(d, user_id, i))
                show(samples[-1])
        elapsed = time.monotonic() - t0
        async with s.get(f"{d.url}/api/volumes") as r:
            listed = await r.json() if r.status == 200 else {"status": r.status}
    return {
        "cycles": done,
        "seconds": round(elapsed, 1),
        "cycles_per_s": round(done / elapsed, 2) if elapsed else None,
        "samples": samples,
        "api_volumes": {k: v for k, v in listed.items() if k != "volumes"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100, help="print a sample every N cycles")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="stop early past this")
    ap.add_argument("--tier", default="free")
    ap.add_argument("--events-max-rows", type=int)
    ap.add_argument("--sweep-interval-s", type=int)
    ap.add_argument("--out", default="growth.json", help="file name under bench/results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    retention = {
        k: v
        for k, v in (
            ("events_max_rows", args.events_max_rows),
            ("sweep_interval_s", args.sweep_interval_s),
        )
        if v is not None
    }
    overrides: dict[str, Any] = {
        "rate_limits": {"create_per_min": 100000, "ops_per_min": 100000, "read_per_min": 100000}
    }
    if retention:
        overrides["retention"] = retention
    base = Path(tempfile.mkdtemp(prefix="rexecd-bench-growth-", dir="/var/tmp"))
    d = Daemon(base, overrides=overrides)
    try:
        d.import_image(ROOT / "build" / "test-images" / "busybox.tar")
        token = d.token("bench", tier=args.tier)
        d.start()
        deadline = time.monotonic() + args.max_seconds
        result = asyncio.run(run(d, token, args.cycles, args.every, deadline))
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)
    result["config"] = {"tier": args.tier, "retention": retention}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
