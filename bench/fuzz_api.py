#!/usr/bin/env python3
"""API fuzzing for a long time: schemathesis over /api/openapi.json against a fresh
daemon, as tests/integration/test_api_fuzz.py does for 90 s, reporting the number of
500 answers (from the fuzzer's report and from the daemon's own log).

Run as root: .venv/bin/python bench/fuzz_api.py [--duration 600] [--workers 2] [--seed N]
Results: a summary on stdout and bench/results/fuzz_api.json; the daemon log and the
HAR report of every exchange stay in the printed work dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration import fuzz  # noqa: E402
from tests.integration.daemon import Daemon  # noqa: E402
from tests.integration.daemon_fixtures import BUSYBOX_TAR, ApiClient  # noqa: E402


async def _seed_container(d: Daemon, token: str) -> None:
    async with ApiClient(d, token) as c:
        await c.create_running(fuzz.SEED_CONTAINER)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=600, help="seconds of fuzzing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--tier", default="free", help="tier of the fuzzing user")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rexecd-fuzz-"))
    (work / "daemon").mkdir()
    d = Daemon(work / "daemon", overrides=fuzz.DAEMON_OVERRIDES)
    try:
        d.import_image(BUSYBOX_TAR)
        d.start()
        token = d.token(fuzz.FUZZ_USER, tier=args.tier, scopes="read,write,admin")
        asyncio.run(_seed_container(d, token))
        before = fuzz.holdings(d, token)
        started = time.monotonic()
        run = fuzz.run_schemathesis(
            d.url,
            token,
            work / "schemathesis",
            max_time=args.duration,
            workers=args.workers,
            seed=args.seed,
        )
        elapsed = time.monotonic() - started
        after = fuzz.holdings(d, token)
        logged = fuzz.server_errors_in_log(d)
        result: dict[str, Any] = {
            "duration_s": round(elapsed, 1),
            "seed": run.seed,
            "workers": args.workers,
            "requests": len(run.exchanges),
            "server_errors_500": len(run.server_errors()),
            "server_errors_in_daemon_log": len(logged),
            "statuses": {str(k): v for k, v in sorted(run.statuses().items())},
            "token_still_works": fuzz.token_works(d, token),
            "holdings_as_expected": after == before.expected_after(run),
            "work_dir": str(work),
        }
        (d.base / "daemon.log.copy").write_text(d.logs())
    finally:
        d.close()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz_api.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for e in run.server_errors()[:20]:
        print(f"500: {e.method} {e.path}: {e.body[:200]}")
    for line in logged[:20]:
        print(f"log: {line[:300]}")
    return 1 if result["server_errors_500"] or logged else 0


if __name__ == "__main__":
    sys.exit(main())
