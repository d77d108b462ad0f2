"""A local apt repository for the role tests, so a role installs with no public network:

* ``fetch``: a role's Debian packages and everything they depend on, downloaded on the
  host with ``apt-get download`` (the mirror the host's apt uses) into a cache outside
  git (``$REXECD_TEST_CACHE``, default /var/cache/rexecd-test), kept between runs, and
  indexed as a flat repository (``dpkg-scanpackages`` from dpkg-dev, and a Release);
* ``serving``: that directory over HTTP on an address the test chose (the bridge
  gateway of its daemon), for the role's apt mirror ``deb [trusted=yes] URL ./``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.deadlines import scaled

CACHE = Path(os.environ.get("REXECD_TEST_CACHE", "/var/cache/rexecd-test"))


def _closure(packages: list[str]) -> list[str]:
    """The packages and their Depends/Pre-Depends, recursively (no Recommends): what an
    image with nothing may need. Virtual names (``<debconf-2.0>``) are left out; the
    real packages providing them are listed by apt-cache too."""
    out = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
        check=True, capture_output=True, text=True, timeout=scaled(120),
    ).stdout  # fmt: skip
    return sorted({ln for ln in out.splitlines() if ln and not ln[0].isspace() and ln[0] != "<"})


def fetch(name: str, packages: list[str]) -> Path:
    """The repository directory holding ``packages`` and their dependencies (cached)."""
    for tool in ("apt-get", "apt-cache", "dpkg-scanpackages"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (dpkg-dev provides dpkg-scanpackages)")
    repo = CACHE / f"apt-{name}"
    stamp = repo / ".complete"
    want = " ".join(sorted(packages))
    if stamp.exists() and stamp.read_text() == want:
        return repo
    repo.mkdir(parents=True, exist_ok=True)
    names = _closure(packages)
    got = subprocess.run(
        ["apt-get", "download", "-q", *names],
        cwd=repo, capture_output=True, text=True, timeout=scaled(900),
    )  # fmt: skip
    if got.returncode != 0:
        # One package without a candidate fails the whole batch: fetch the rest alone.
        for pkg in names:
            subprocess.run(
                ["apt-get", "download", "-q", pkg], cwd=repo, capture_output=True,
                timeout=scaled(300),
            )  # fmt: skip
    if not any(repo.glob("*.deb")):
        pytest.skip(f"apt-get download fetched nothing (no mirror reachable?): {got.stderr[-500:]}")
    index(repo)
    stamp.write_text(want)
    return repo


def index(repo: Path) -> None:
    """Write Packages, Packages.gz and a Release naming their hashes (a flat repo)."""
    packages = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."],
        cwd=repo, check=True, capture_output=True, timeout=scaled(300),
    ).stdout  # fmt: skip
    (repo / "Packages").write_bytes(packages)
    (repo / "Packages.gz").write_bytes(gzip.compress(packages))
    lines = ["Origin: rexecd-test", "Label: rexecd-test", "SHA256:"]
    for f in ("Packages", "Packages.gz"):
        data = (repo / f).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {f}")
    (repo / "Release").write_text("\n".join(lines) + "\n")


@contextmanager
def serving(repo: Path, host: str, port: int) -> Iterator[str]:
    """``repo`` over HTTP on ``host:port`` (python's http.server) until the block ends;
    yields the base URL."""
    log = open(repo.parent / f".http-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", host, "--directory", str(repo), str(port)],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + scaled(20)
        while True:
            try:
                with socket.create_connection((host, port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server on {host}:{port} did not start") from None
                time.sleep(0.05)
        yield f"http://{host}:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
