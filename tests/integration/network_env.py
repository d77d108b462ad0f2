"""Helpers for the network integration tests: throwaway netns sleepers, unique names, probes."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rexecd.runtime.network import Network, NetworkConfig

PY = sys.executable

# A tiny echo server: prints "ready" once listening, answers "pong:<data>" per connection.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.settimeout(5)
        try:
            c.sendall(b"pong:" + c.recv(64))
        except OSError:
            pass
"""

# Connects, says ping, expects pong; exit status 0 on success, 1 otherwise.
PROBE = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.sendall(b"ping"); c.settimeout(float(sys.argv[3]))
        sys.exit(0 if c.recv(64) == b"pong:ping" else 1)
except OSError:
    sys.exit(1)
"""

# Receives one connection and reports bytes and seconds from first byte to EOF.
RECEIVER = r"""
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(b)
print(json.dumps({"bytes": n, "secs": time.monotonic() - t0}), flush=True)
"""

# Sends as fast as the socket takes it for argv[3] seconds.
SENDER = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b"x" * (1 << 16); end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def rand_hex(n: int) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


def _host_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            nets.append(ipaddress.IPv4Interface(m.group(1)).network)
    for line in subprocess.run(
        ["ip", "-4", "route"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        dst = line.split()[0]
        if dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def pick_subnet() -> str:
    """A random 10.2xx.y.0/24 that no host address or route overlaps."""
    used = _host_networks()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randint(200, 249)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free test subnet")


def unique_config(**extra: object) -> NetworkConfig:
    tag = rand_hex(8)
    return NetworkConfig(
        bridge=f"rxt{tag}",
        subnet=pick_subnet(),
        nft_table=f"rxt_{tag}",
        **extra,
    )


class Sleeper:
    """A process alone in a fresh network namespace: a stand-in container init."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "1000"])
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 5
        # unshare(1) execs sleep only after unsharing: wait until the netns differs,
        # or we would configure the host's own namespace.
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.pid}/ns/net") != ours and self._is_sleep():
                    return
            time.sleep(0.005)
        self.kill()
        raise RuntimeError("sleeper did not enter its own netns")

    def _is_sleep(self) -> bool:
        with open(f"/proc/{self.pid}/comm") as f:
            return f.read().strip() == "sleep"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net=/proc/{self.pid}/ns/net", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["nsenter", f"--net=/proc/{self.pid}/ns/net", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def link_names(self) -> list[str]:
        out = self.run("ip", "-o", "link").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(
            f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@dataclass
class Env:
    """One test's network: a Network on unique names plus the sleepers it made."""

    net: Network
    sleepers: list[Sleeper] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def cfg(self) -> NetworkConfig:
        return self.net.cfg

    def sleeper(self) -> Sleeper:
        s = Sleeper()
        self.sleepers.append(s)
        return s

    def ip(self, n: int) -> str:
        return str(ipaddress.IPv4Network(self.cfg.subnet).network_address + n)

    def server(self, where: Sleeper | None, ip: str, port: int) -> subprocess.Popen[str]:
        argv = (PY, "-c", ECHO_SERVER, ip, str(port))
        if where is None:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        else:
            proc = where.popen(*argv)
        self.procs.append(proc)
        wait_ready(proc)
        return proc

    @staticmethod
    def probe(where: Sleeper | None, ip: str, port: int, timeout: float = 1.0) -> bool:
        argv = (PY, "-c", PROBE, ip, str(port), str(timeout))
        if where is None:
            return subprocess.run(argv, timeout=timeout + 20).returncode == 0
        return where.run(*argv, timeout=timeout + 20).returncode == 0

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)
        try:
            self.net.teardown_host()
        finally:
            for s in self.sleepers:
                s.kill()
            force_cleanup(self.cfg)


def force_cleanup(cfg: NetworkConfig) -> None:
    """Remove anything named after ``cfg`` even if teardown_host failed half-way."""
    links = subprocess.run(["ip", "-d", "-o", "link"], capture_output=True, text=True).stdout
    marker = f'"br":"{cfg.bridge}"'
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == cfg.bridge or marker in line or f"master {cfg.bridge} " in line:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    for family in ("inet", "bridge"):
        subprocess.run(["nft", "delete", "table", family, cfg.nft_table], capture_output=True)


@contextlib.contextmanager
def network_env(**extra: object) -> Iterator[Env]:
    cfg = unique_config(**extra)
    net = Network(cfg)
    env = Env(net)
    try:
        net.setup_host()
        yield env
    finally:
        env.close()


def our_links(cfg: NetworkConfig) -> list[str]:
    """Host link lines that belong to ``cfg``'s network, for before/after comparisons."""
    out = subprocess.run(["ip", "-d", "-o", "link"], capture_output=True, text=True).stdout
    marker = f'"br":"{cfg.bridge}"'
    return sorted(
        line.split(":")[1].strip().split("@")[0]
        for line in out.splitlines()
        if marker in line or f"master {cfg.bridge} " in line
    )


def our_ruleset(cfg: NetworkConfig) -> str:
    return "".join(
        subprocess.run(
            ["nft", "list", "table", family, cfg.nft_table], capture_output=True, text=True
        ).stdout
        for family in ("inet", "bridge")
    )


def measure(
    receiver_at: Sleeper | None, sender_at: Sleeper | None, ip: str, port: int, secs: float = 3.0
) -> float:
    """Mbit/s of goodput of one TCP stream from ``sender_at`` to a receiver at ip:port."""
    argv = (PY, "-c", RECEIVER, ip, str(port))
    if receiver_at is None:
        recv = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        recv = receiver_at.popen(*argv)
    try:
        wait_ready(recv)
        send_argv = (PY, "-c", SENDER, ip, str(port), str(secs))
        if sender_at is None:
            sent = subprocess.run(send_argv, capture_output=True, text=True, timeout=secs + 30)
        else:
            sent = sender_at.run(*send_argv, timeout=secs + 30)
        assert sent.returncode == 0, sent.stderr
        out, err = recv.communicate(timeout=30)
        assert recv.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        return float(result["bytes"]) * 8 / float(result["secs"]) / 1e6
    finally:
        stop(recv)
