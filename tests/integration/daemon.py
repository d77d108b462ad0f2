"""A real ``rexecd serve`` for integration tests: its own state, run dir, socket, TCP
port, bridge, subnet, nft table and cgroup parent; everything removed on close."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.deadlines import scaled

ROOT = Path(__file__).resolve().parents[2]
# scripts/build-test-image writes here (scripts/setup runs it); git-ignored.
TEST_IMAGES = ROOT / "build" / "test-images"
RX = [sys.executable, "-m", "rexecd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    """One daemon process; ``restart(kill=True)`` is the crash-and-recover path."""

    base: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    proc: subprocess.Popen[bytes] | None = None
    # A command that execs its arguments, run in front of the daemon (a wrapper that
    # gives it a session keyring, say).
    launcher: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = self.base / "state"
        self.run = Path("/run") / f"rexecd-test-{self.tag}"
        self.sock = self.run / "rexecd.sock"
        self.port = free_port()
        self.bridge = f"rxt{self.tag}"
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:4], 16)}.0/24"
        self.nft_table = f"rxt_{self.tag}"
        self.cgroup_parent = f"rexecd-test-{self.tag}"
        cfg: dict[str, Any] = {
            "listen": [f"unix:{self.sock}", f"tcp:127.0.0.1:{self.port}"],
            "state_dir": str(self.state),
            "run_dir": str(self.run),
            "network": {"bridge": self.bridge, "subnet": self.subnet, "nft_table": self.nft_table},
            "cgroup": {"parent": self.cgroup_parent},
            "minimums": {"memory_mb": 16, "cpu_millicores": 10, "disk_mb": 16},
            "rate_limits": {"create_per_min": 1000, "ops_per_min": 1000, "read_per_min": 5000},
            "stop_timeout_s": 2,
            # Never reach a public registry from a test: tests that pull turn this on
            # with a mirror on loopback (mirrors_only).
            "registries": {"pull": False},
        }
        _merge(cfg, self.overrides)
        self.config = self.base / "rexecd.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = self.base / "daemon.log"
        # Before any kernel object exists: a run killed from here on is swept later.
        self.owner = OwnerRecord.mine(self)
        self.owner.save()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        out = subprocess.run([*RX, *args], check=True, capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip()

    def token(self, user: str, tier: str = "free", scopes: str = "read,write") -> str:
        return self.cli(
            "token",
            "create",
            "--state-dir",
            str(self.state),
            "--user",
            user,
            "--tier",
            tier,
            "--scopes",
            scopes,
        )

    def import_image(self, path: Path) -> None:
        self.cli("image", "import", "--state-dir", str(self.state), str(path))

    def start(self, timeout: float = 30.0) -> None:
        timeout = scaled(timeout)
        log = open(self.log, "ab")  # noqa: SIM115 - the daemon writes to it until stopped
        self.proc = subprocess.Popen(
            [*self.launcher, *RX, "serve", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        log.close()
        self.owner.daemon = _identity(self.proc.pid)
        self.owner.save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=scaled(20))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop the daemon and remove every container and kernel object it made."""
        self.stop()
        self.owner.remove_objects()
        self.owner.forget()


# ------------------------------------------------------------------ the leak sweep
#
# close() runs from finally blocks: a pytest killed with SIGKILL (or a timeout's kill)
# never runs it, and its daemon, bridge, nft tables, veths, cgroups, loop devices and
# mounts stay. Each Daemon therefore records, before it makes anything, who owns it
# (the pytest or bench process, by pid and start time) and the names of its objects;
# a new session removes the objects of every record whose owner is gone. Records of a
# live owner (another run in progress) are never touched, nor is anything not named in
# a record: other daemons' objects, test or not, stay as they are.

OWNERS = Path("/run/rexecd-test-owners")


def _start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``; None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # exited: a zombie owner will never close anything
    return int(fields[19])


def _identity(pid: int) -> list[int] | None:
    start = _start_time(pid)
    return None if start is None else [pid, start]


def is_alive(ident: list[int] | None, start_time: Any = _start_time) -> bool:
    """Whether the process recorded as ``[pid, start time]`` still runs: the same pid
    with another start time is a new process that reused the number."""
    if ident is None:
        return False
    pid, start = ident
    return bool(start_time(pid) == start)


@dataclass
class OwnerRecord:
    """Who owns one test daemon and what it may have made; JSON in ``OWNERS``."""

    tag: str
    owner: list[int]  # [pid, start time] of the process that made the Daemon
    base: str
    run: str
    bridge: str
    subnet: str
    nft_table: str
    cgroup_parent: str
    daemon: list[int] | None = None  # [pid, start time] once started

    @classmethod
    def mine(cls, d: Daemon) -> OwnerRecord:
        ident = _identity(os.getpid())
        assert ident is not None
        return cls(
            d.tag, ident, str(d.base), str(d.run), d.bridge, d.subnet, d.nft_table, d.cgroup_parent
        )

    @property
    def path(self) -> Path:
        return OWNERS / f"{self.tag}.json"

    def save(self) -> None:
        OWNERS.mkdir(mode=0o700, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        tmp.rename(self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> OwnerRecord | None:
        try:
            rec = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        # The names must be a test daemon's, whatever the file says: the sweep removes
        # only objects matching these patterns.
        t = rec.tag
        ok = (
            len(t) == 6
            and all(ch in "0123456789abcdef" for ch in t)
            and path.name == f"{t}.json"
            and rec.run == f"/run/rexecd-test-{t}"
            and rec.bridge == f"rxt{t}"
            and rec.nft_table == f"rxt_{t}"
            and rec.cgroup_parent == f"rexecd-test-{t}"
        )
        return rec if ok else None

    def is_stale(self, start_time: Any = _start_time) -> bool:
        """Sweep only a record whose owner is dead (and so can never close it)."""
        return not is_alive(self.owner, start_time)

    def remove_objects(self) -> None:
        """Stop the daemon if it still runs, and remove every object of its names."""
        if self.daemon is not None and is_alive(self.daemon):
            os.kill(self.daemon[0], signal.SIGKILL)
            deadline = time.monotonic() + scaled(20)
            while is_alive(self.daemon) and time.monotonic() < deadline:
                _reap(self.daemon[0])
                time.sleep(0.05)
        from rexecd.runtime.cgroups import open_driver

        drv = open_driver(self.cgroup_parent)
        for name in drv.list():
            drv.open(name).destroy()
        drv.remove_parent()
        from rexecd.runtime.network import Network, NetworkConfig

        Network(
            NetworkConfig(bridge=self.bridge, subnet=self.subnet, nft_table=self.nft_table)
        ).teardown_host()
        _unmount_under(Path(self.run))
        _unmount_under(Path(self.base))
        _detach_loops_under(Path(self.base))
        shutil.rmtree(self.run, ignore_errors=True)


def _reap(pid: int) -> None:
    # Our own child (a daemon this process started) stays a zombie until waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def sweep_dead_owners() -> list[str]:
    """Remove the objects of every test daemon whose owning process has died; returns
    their tags. Needs root; records of live owners are left alone."""
    swept = []
    for path in sorted(OWNERS.glob("*.json")) if OWNERS.is_dir() else []:
        rec = OwnerRecord.load(path)
        if rec is None or not rec.is_stale():
            continue
        rec.remove_objects()
        rec.forget()
        swept.append(rec.tag)
    return swept


def _detach_loops_under(path: Path) -> None:
    prefix = str(path) + "/"
    for d in Path("/sys/block").glob("loop*"):
        try:
            backing = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            subprocess.run(["losetup", "-d", f"/dev/{d.name}"], check=False)


def _unmount_under(path: Path) -> None:
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def api(
    d: Daemon, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A plain HTTP request over TCP, as any client would make it."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(d.url + path, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=scaled(60)) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else {}, dict(e.headers)


def wait_status(d: Daemon, token: str, ref: str, want: str, timeout: float = 30) -> dict[str, Any]:
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        code, last, _ = api(d, "GET", f"/api/containers/{ref}", token)
        if code == 200 and last.get("status") == want:
            return last
        if last.get("status") == "error" and want != "error":
            raise AssertionError(f"container failed: {last}")
        time.sleep(0.05)
    raise AssertionError(f"{ref} not {want} in {timeout}s: {last}")


os.environ.setdefault("PYTHONUNBUFFERED", "1")
