#!/usr/bin/env python3
"""Pull benchmark: debian:bookworm (scripts/build-debian-image) from a registry on
loopback into a fresh local store, rexecd against `skopeo copy` + `umoci unpack` and
against `podman pull`, in the same run, same registry, same disk.

* rexecd: the daemon's Puller (manifest, config, the gzip layer streamed through
  the digest checks into the safe unpacker, synced to disk, recorded);
* skopeo + umoci: `skopeo copy docker://... oci:DIR` (download, digest checks), then
  `umoci unpack` (decompress and extract into a runtime bundle);
* podman: `podman pull` into its own storage (overlay driver), settings as in
  bench/podman_env.py.

Each tool starts from an empty store every round. Needs root, docker-registry, skopeo,
umoci and podman (apt-get install docker-registry skopeo umoci podman).

Run: .venv/bin/python bench/pull.py [--rounds 3] [--dir /var/tmp]
Results: a table on stdout and bench/results/pull.json.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.podman_env import PodmanEnv  # noqa: E402
from rexecd.config import RegistriesConfig  # noqa: E402
from rexecd.runtime.images import ImageStore  # noqa: E402
from rexecd.service.registry import Puller  # noqa: E402
from tests.integration.registry import Registry  # noqa: E402

CACHE = Path(os.environ.get("REXECD_TEST_CACHE", "/var/cache/rexecd-test")) / "debian-bookworm"
REPO = "library/debian:bookworm"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=900)
    return time.perf_counter() - t0


def rexecd_round(host: str, work: Path) -> dict[str, float]:
    store = ImageStore(work / "rexecd")
    cfg = RegistriesConfig.model_validate({"mirrors": {"docker.io": [host]}, "mirrors_only": True})

    async def pull() -> float:
        puller = Puller(cfg, store)
        try:
            t0 = time.perf_counter()
            await puller.pull("debian:bookworm")
            return time.perf_counter() - t0
        finally:
            await puller.close()

    return {"total_s": asyncio.run(pull())}


def skopeo_umoci_round(host: str, work: Path) -> dict[str, float]:
    layout = work / "oci"
    copy = timed(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{host}/{REPO}", f"oci:{layout}:bookworm"]
    )  # fmt: skip
    unpack = timed(["umoci", "unpack", "--image", f"{layout}:bookworm", str(work / "bundle")])
    return {"copy_s": copy, "unpack_s": unpack, "total_s": copy + unpack}


def podman_round(host: str, _work: Path) -> dict[str, float]:
    env = PodmanEnv()
    try:
        t = timed(env.cmd("pull", "--quiet", "--tls-verify=false", f"{host}/{REPO}"), env.env)
    finally:
        env.close()
    return {"total_s": t}


def summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds}
    for key in rounds[0]:
        out[f"median_{key}"] = round(statistics.median(r[key] for r in rounds), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where stores go")
    ap.add_argument("--skip", action="append", default=[], choices=["skopeo", "podman"])
    args = ap.parse_args()
    if not (CACHE / "oci" / "index.json").exists():
        print(f"{CACHE} missing: run scripts/build-debian-image", file=sys.stderr)
        return 1
    tools = {"rexecd": rexecd_round}
    if "skopeo" not in args.skip:
        tools["skopeo+umoci"] = skopeo_umoci_round
    if "podman" not in args.skip:
        tools["podman"] = podman_round
    base = Path(tempfile.mkdtemp(prefix="rexecd-bench-pull-", dir=args.dir))
    registry = Registry(base / "registry")
    registry.start()
    results: dict[str, Any] = {}
    try:
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{CACHE / 'oci'}:bookworm", f"docker://{registry.host}/{REPO}"],
            check=True, capture_output=True,
        )  # fmt: skip
        layer = max((CACHE / "oci" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
        results["image"] = {
            "layer_bytes": layer.stat().st_size,
            "rootfs_bytes": (CACHE / "rootfs.tar").stat().st_size,
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
        for i in range(args.rounds):
            # Interleaved, so a slow moment of the shared disk hits every tool alike.
            for name, fn in tools.items():
                work = base / f"{name.replace('+', '-')}-{i}"
                work.mkdir()
                try:
                    runs[name].append({k: round(v, 3) for k, v in fn(registry.host, work).items()})
                finally:
                    subprocess.run(["umount", "-R", str(work)], capture_output=True, check=False)
                    shutil.rmtree(work, ignore_errors=True)
                print(f"round {i + 1} {name}: {runs[name][-1]}", file=sys.stderr)
        for name, rounds in runs.items():
            results[name] = summary(rounds)
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pull.json").write_text(json.dumps(results, indent=2) + "\n")
    mb = results["image"]["layer_bytes"] / 1e6
    print(f"debian:bookworm, one {mb:.1f} MB gzip layer, {args.rounds} rounds, medians:")
    print(f"{'tool':16} {'total s':>9}  detail")
    for name in tools:
        r = results[name]
        detail = ", ".join(
            f"{k[7:]} {v}"
            for k, v in r.items()
            if k.startswith("median_") and k != "median_total_s"
        )
        print(f"{name:16} {r['median_total_s']:>9.3f}  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
