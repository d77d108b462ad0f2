"""Start-up on a busy listen address: one line naming the address, a non-zero exit, and
nothing made on the host (no bridge, nft table, cgroup parent, state or run dir)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deadlines import scaled
from tests.integration.daemon import ROOT, RX, Daemon
from tests.integration.daemon_fixtures import cgroup_parent_dirs


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def serve_once(d: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RX, "serve", "--config", str(d.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=scaled(60),
    )


def host_leftovers(d: Daemon) -> list[str]:
    found = []
    if subprocess.run(["ip", "link", "show", "dev", d.bridge], capture_output=True).returncode == 0:
        found.append(f"bridge {d.bridge}")
    for family in ("inet", "bridge"):
        r = subprocess.run(["nft", "list", "table", family, d.nft_table], capture_output=True)
        if r.returncode == 0:
            found.append(f"nft table {family} {d.nft_table}")
    found += [f"cgroup {p}" for p in cgroup_parent_dirs(d).values() if p.exists()]
    found += [f"dir {p}" for p in (d.state, d.run) if p.exists()]
    return found


def listen_on(d: Daemon, *addresses: str) -> None:
    cfg = yaml.safe_load(d.config.read_text())
    cfg["listen"] = list(addresses)
    d.config.write_text(yaml.safe_dump(cfg))


def test_busy_tcp_port_is_one_line_and_leaves_nothing(tmp_path: Path, held_port: int) -> None:
    d = Daemon(tmp_path)
    # The unix socket first: the one bound before the busy port is undone, its dir too.
    listen_on(d, f"unix:{d.sock}", f"tcp:127.0.0.1:{held_port}")
    try:
        r = serve_once(d)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "Traceback" not in out, out
        errors = [line for line in out.splitlines() if line.startswith("rexecd:")]
        assert errors == [
            f"rexecd: cannot listen on tcp:127.0.0.1:{held_port}: Address already in use"
        ], out
        assert host_leftovers(d) == [], out
    finally:
        d.close()


def test_live_unix_socket_is_not_taken_over(tmp_path: Path) -> None:
    """A unix socket another process listens on is busy too: not unlinked and rebound."""
    d = Daemon(tmp_path)
    d.sock.parent.mkdir(parents=True)
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.bind(str(d.sock))
        holder.listen()
        r = serve_once(d)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "Traceback" not in out, out
        assert f"rexecd: cannot listen on unix:{d.sock}: Address already in use" in out, out
        # The holder still owns its socket.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(d.sock))
        assert [x for x in host_leftovers(d) if not x.startswith("dir")] == [], out
    finally:
        holder.close()
        d.close()
