#!/usr/bin/env python3
"""CLI start-to-answer latency: ``rexec ls`` against a running daemon, side by side with
``podman ps`` and ``incus list`` where they are installed, plus the floors that bound
it on this machine (``python -c pass``; ``python -X importtime`` of the CLI).

Run as root: .venv/bin/python bench/cli_latency.py [--runs 30]
A daemon (a temporary one with one busybox container) is started unless REXEC_HOST
and REXEC_TOKEN point at one. Uses hyperfine when installed, else a timed loop.
Results: a table on stdout and bench/results/cli_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
REXEC = [PY, "-m", "rexecd.client.cli"]


def timed(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall-clock milliseconds of ``runs`` runs (after 3 warm-ups)."""
    hyperfine = shutil.which("hyperfine")
    if hyperfine is not None:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(
                [hyperfine, "-N", "-w", "3", "-r", str(runs), "--export-json", out.name,
                 "--", " ".join(cmd)],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            return [t * 1000 for t in json.load(open(out.name))["results"][0]["times"]]
    samples = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        if i >= 3:
            samples.append((time.perf_counter() - t0) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_ms": round(statistics.median(s), 1),
        "p95_ms": round(s[max(0, int(len(s) * 0.95) - 1)], 1),
        "min_ms": round(s[0], 1),
        "runs": len(s),
    }


def import_ms(env: dict[str, str]) -> float:
    """Sum of the top-level import times of ``rexec ls`` (``-X importtime``)."""
    r = subprocess.run(
        [PY, "-X", "importtime", "-m", "rexecd.client.cli", "ls"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    total = 0
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            total += int(m.group(1))
    return round(total / 1000, 1)


@contextmanager
def daemon() -> Iterator[dict[str, str]]:
    if os.environ.get("REXEC_HOST") and os.environ.get("REXEC_TOKEN"):
        yield {}
        return
    from tests.integration.daemon import Daemon, api, wait_status
    from tests.integration.terminal_client import BUSYBOX_TAR

    d = Daemon(Path(tempfile.mkdtemp(prefix="rexecd-clibench-")))
    try:
        d.import_image(BUSYBOX_TAR)
        d.start()
        token = d.token("bench", tier="pro")
        api(d, "POST", "/api/containers", token, {"image": "busybox", "name": "bench"})
        wait_status(d, token, "bench", "running")
        yield {"REXEC_HOST": f"unix:{d.sock}", "REXEC_TOKEN": token}
    finally:
        d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    results: dict[str, object] = {"load_average": os.getloadavg()}
    with daemon() as extra:
        env = {**os.environ, **extra, "PYTHONPATH": str(ROOT)}
        rows: dict[str, dict[str, float]] = {
            "python -c pass": summary(timed([PY, "-c", "pass"], args.runs, env)),
            "rexec ls": summary(timed([*REXEC, "ls"], args.runs, env)),
        }
        results["rexec_ls_imports_ms"] = import_ms(env)
        if shutil.which("podman"):
            from bench.podman_env import PodmanEnv

            pod = PodmanEnv()
            try:
                rows["podman ps"] = summary(timed(pod.cmd("ps"), args.runs, pod.env))
            finally:
                with suppress(Exception):
                    pod.close()
        if shutil.which("incus"):
            rows["incus list"] = summary(timed(["incus", "list"], args.runs, env))
    base = rows["rexec ls"]["median_ms"]
    print(f"{'command':<16} {'median':>9} {'p95':>9} {'min':>9}  rexec ls / this")
    for name, row in rows.items():
        ratio = base / row["median_ms"] if row["median_ms"] else float("nan")
        print(
            f"{name:<16} {row['median_ms']:>7.1f}ms {row['p95_ms']:>7.1f}ms "
            f"{row['min_ms']:>7.1f}ms  {ratio:.2f}"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"imports of rexec ls: {results['rexec_ls_imports_ms']} ms; load average {load}")
    for name in ("podman", "incus"):
        if not shutil.which(name):
            print(f"({name} is not installed here: no comparison row)")
    results["rows"] = rows
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "cli_latency.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
