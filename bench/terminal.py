#!/usr/bin/env python3
"""Terminal latency and throughput: keystroke echo round-trip and bulk output through a
real rexecd's terminal WebSocket, side by side with local equivalents in the same run:
``podman exec -t`` into a busybox container (when podman can run one here) and a plain
host PTY running busybox sh (pty.fork: no container, no network, the floor).

Echo: one key as an input frame (a raw PTY write locally), timed until its echo comes
back from the shell's line editor (busybox ash), then a backspace, timed the same way,
so the line stays short. Bulk: ``head -c N /dev/zero | tr '\\0' x`` streamed to the
client, which counts every byte (the WebSocket client parses every frame).

Run as root: .venv/bin/python bench/terminal.py [--samples 1000] [--bytes 100000000]
Results: a table on stdout and bench/results/terminal.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pty
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.podman_env import PodmanEnv  # noqa: E402
from tests.integration.daemon import Daemon, api, wait_status  # noqa: E402

BUSYBOX_TAR = ROOT / "build" / "test-images" / "busybox.tar"
RESULTS = ROOT / "bench" / "results" / "terminal.json"
WARMUP = 20
KEYS = (("x", "x"), ("\x7f", "\x08"))  # (key, what its echo contains)


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[max(0, int(len(ms) * 0.99) - 1)], 3),
        "min_ms": round(ms[0], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "samples": len(ms),
    }


def bulk_command(nbytes: int) -> str:
    return f"echo S''B; head -c {nbytes} /dev/zero | tr '\\0' x; echo; echo E''B\r"


# ------------------------------------------------------------------ rexecd WebSocket


async def ws_bench(d: Daemon, token: str, ref: str, samples: int, nbytes: int) -> dict[str, Any]:
    url = d.url.replace("http://", "ws://") + f"/ws/terminal/{ref}?id=bench"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, protocols=("rexec.v1", f"rexec.token.{token}")) as ws,
    ):
        out = ""

        async def next_output() -> str:
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"socket ended: {msg}")
                frame = json.loads(msg.data)
                if frame["type"] == "output":
                    data: str = frame["data"]
                    return data

        async def until(text: str) -> None:
            nonlocal out
            while text not in out:
                out += await next_output()
            out = out[out.index(text) + len(text) :]

        async def send(data: str) -> None:
            await ws.send_str(json.dumps({"type": "input", "data": data}))

        await send("echo RE''ADY\r")
        await until("READY\r\n")
        await until("# ")  # the prompt: the line editor is reading keys now
        await asyncio.sleep(0.2)  # and the prompt's trailing bytes are through

        times: list[float] = []
        for i in range(samples + WARMUP):
            key, echo = KEYS[i % 2]
            t0 = time.perf_counter()
            await send(key)
            got = await next_output()
            dt = time.perf_counter() - t0
            if echo not in got:
                raise RuntimeError(f"unexpected echo {got!r} for {key!r}")
            if i >= WARMUP:
                times.append(dt)

        await send("\x15")  # kill the line
        await asyncio.sleep(0.2)
        out = ""
        t0 = time.perf_counter()
        await send(bulk_command(nbytes))
        await until("SB\r\n")
        xs = 0
        tail = ""
        while "EB\r\n" not in tail:
            chunk = await next_output()
            xs += chunk.count("x")
            tail = (tail + chunk)[-64:]
        elapsed = time.perf_counter() - t0
        if xs != nbytes:
            raise RuntimeError(f"bulk: {xs} bytes arrived of {nbytes}")
        return {"echo": summary(times), "bulk": bulk_result(nbytes, elapsed)}


def bulk_result(nbytes: int, elapsed: float) -> dict[str, float]:
    return {
        "bytes": nbytes,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(nbytes / elapsed / 1e6, 1),
    }


# ------------------------------------------------------------------ a local PTY


def pty_bench(
    argv: list[str], samples: int, nbytes: int, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``argv`` on a PTY of ours: the shell's echo and output read from the master."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "TERM": "xterm-256color",
        "PS1": "# ",
        "HOME": "/root",
        **(extra_env or {}),
    }
    pid, fd = pty.fork()
    if pid == 0:  # the child execs at once: nothing of this process runs on in it
        os.execvpe(argv[0], argv, env)
    buf = b""

    def read(timeout: float = 30.0) -> bytes:
        if not select.select([fd], [], [], timeout)[0]:
            raise RuntimeError(f"{argv[0]}: no output in {timeout}s; had {buf[-200:]!r}")
        return os.read(fd, 65536)

    def until(text: bytes) -> None:
        nonlocal buf
        while text not in buf:
            buf += read()
        buf = buf[buf.index(text) + len(text) :]

    try:
        os.write(fd, b"echo RE''ADY\r")
        until(b"READY\r\n")
        until(b"# ")
        time.sleep(0.2)
        while select.select([fd], [], [], 0)[0]:
            os.read(fd, 65536)
        times: list[float] = []
        for i in range(samples + WARMUP):
            key, echo = KEYS[i % 2]
            t0 = time.perf_counter()
            os.write(fd, key.encode())
            got = read()
            dt = time.perf_counter() - t0
            if echo.encode() not in got:
                raise RuntimeError(f"unexpected echo {got!r} for {key!r}")
            if i >= WARMUP:
                times.append(dt)
        os.write(fd, b"\x15")
        time.sleep(0.2)
        while select.select([fd], [], [], 0)[0]:
            os.read(fd, 65536)
        buf = b""
        t0 = time.perf_counter()
        os.write(fd, bulk_command(nbytes).encode())
        until(b"SB\r\n")
        xs = buf.count(b"x")
        tail = buf[-64:]
        while b"EB\r\n" not in tail:
            chunk = read()
            xs += chunk.count(b"x")
            tail = (tail + chunk)[-64:]
        elapsed = time.perf_counter() - t0
        if xs != nbytes:
            raise RuntimeError(f"bulk: {xs} bytes arrived of {nbytes}")
        return {"echo": summary(times), "bulk": bulk_result(nbytes, elapsed)}
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


class Podman:
    """A busybox container under podman (no network), for ``podman exec -t``."""

    NAME = "rexecd-bench-terminal"

    def __init__(self) -> None:
        self.env = PodmanEnv()

    def start(self) -> None:
        self.env.run("load", "-i", str(BUSYBOX_TAR))
        r = self.env.run(
            "run",
            "-d",
            "--name",
            self.NAME,
            "--network",
            "none",
            "busybox:latest",
            "sleep",
            "1000000",
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr else "podman run")

    def exec_argv(self) -> list[str]:
        return self.env.cmd("exec", "-it", self.NAME, "sh")

    def close(self) -> None:
        self.env.close()


# ------------------------------------------------------------------ main


def attempt(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    print(f"running: {name} ...", flush=True)
    try:
        results[name] = fn()
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        results[name] = {"skipped": str(exc)}
        print(f"  {name} skipped: {exc}", flush=True)


def goal_met(results: dict[str, Any]) -> bool:
    echo = results.get("rexecd_websocket", {}).get("echo")
    return echo is not None and echo["p50_ms"] < 2.0


def daemon_bench(samples: int, nbytes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rexecd-bench-terminal-") as tmp:
        d = Daemon(Path(tmp))
        try:
            d.import_image(BUSYBOX_TAR)
            d.start()
            token = d.token("bench", tier="pro")
            code, body, _ = api(
                d, "POST", "/api/containers", token, {"image": "busybox", "name": "bench"}
            )
            if code != 202:
                raise RuntimeError(f"create: {code} {body}")
            wait_status(d, token, "bench", "running")
            return asyncio.run(ws_bench(d, token, "bench", samples, nbytes))
        finally:
            d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=100_000_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon makes namespaces, cgroups and a bridge")
    results: dict[str, Any] = {}
    attempt("rexecd_websocket", lambda: daemon_bench(args.samples, args.bytes), results)
    if shutil.which("podman"):
        podman = Podman()

        def run_podman() -> dict[str, Any]:
            podman.start()
            return pty_bench(
                podman.exec_argv(),
                args.samples,
                args.bytes,
                extra_env={"CONTAINERS_CONF": podman.env.env["CONTAINERS_CONF"]},
            )

        try:
            attempt("podman_exec_t", run_podman, results)
        finally:
            podman.close()
    else:
        results["podman_exec_t"] = {"skipped": "podman is not installed"}
    busybox = shutil.which("busybox") or "/bin/busybox"
    attempt(
        "host_pty_busybox_sh", lambda: pty_bench([busybox, "sh"], args.samples, args.bytes), results
    )

    print()
    print(f"{'path':<22} {'echo p50':>10} {'echo p99':>10} {'echo min':>10} {'bulk MB/s':>10}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<22} skipped: {r['skipped']}")
            continue
        e, b = r["echo"], r["bulk"]
        print(
            f"{name:<22} {e['p50_ms']:>8.3f}ms {e['p99_ms']:>8.3f}ms {e['min_ms']:>8.3f}ms"
            f" {b['mb_per_s']:>10.1f}"
        )
    print(f"\ngoal (rexecd echo p50 < 2 ms): {'met' if goal_met(results) else 'NOT met'}")
    doc = {
        "benchmark": "terminal",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "echo_samples": args.samples,
        "bulk_bytes": args.bytes,
        "method": {
            "echo": "one key, then a backspace, each timed from send to the first output "
            "carrying its echo from busybox ash's line editor",
            "bulk": "head -c N /dev/zero | tr '\\0' x, timed from sending the command to "
            "the end marker, every byte counted by the client",
        },
        "goal": {"rexecd_websocket_echo_p50_ms_below": 2.0, "met": goal_met(results)},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
