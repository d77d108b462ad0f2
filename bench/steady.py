#!/usr/bin/env python3
"""Steady-state benchmark: N create/exec/terminal/delete cycles against a test daemon.

Each cycle creates a container and waits until it runs, runs an exec, opens a terminal
WebSocket, runs a command in it and reads its output, closes the socket and deletes the
container. Every ``--every`` cycles it samples the daemon's and the spawner's open fds,
threads and mount table (/proc/PID/mountinfo), the host's mounts under the daemon's
dirs, and the daemon's RSS. Exits 1 when fds, mounts or threads grew from the first
sample to the last by more than the slack in tests/integration/steady.py.

Run as root: .venv/bin/python bench/steady.py [--cycles 200] [--every 20]
Results: a table on stdout and bench/results/steady.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration import steady  # noqa: E402
from tests.integration.daemon import Daemon  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "steady.json"
COLUMNS = [f.name for f in fields(steady.Sample)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon makes namespaces, cgroups and a bridge")
    print(" ".join(f"{c:>15}" for c in COLUMNS), flush=True)

    def report(s: steady.Sample) -> None:
        print(" ".join(f"{v:>15}" for v in s.row().values()), flush=True)

    with tempfile.TemporaryDirectory(prefix="rexecd-bench-steady-") as tmp:
        d = Daemon(Path(tmp))
        try:
            d.import_image(ROOT / "build" / "test-images" / "busybox.tar")
            d.start()
            token = d.token("bench", tier="pro")
            samples = asyncio.run(steady.run(d, token, args.cycles, args.every, report=report))
        finally:
            d.close()
    grown = steady.growth(samples[0], samples[-1])
    result = {
        "benchmark": "steady",
        "cycles": args.cycles,
        "samples": [s.row() for s in samples],
        "first": samples[0].row(),
        "last": samples[-1].row(),
        "grown": grown,
        "slack": steady.SLACK,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    for key in COLUMNS[2:]:
        print(f"{key:>16}: {getattr(samples[0], key):>8} -> {getattr(samples[-1], key):>8}")
    if grown:
        print(f"GREW past the slack: {grown}")
        return 1
    print("flat: no fd, mount or thread growth past the slack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
