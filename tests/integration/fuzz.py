"""Schemathesis against a live daemon, shared by the suite's bounded run and
``bench/fuzz_api.py`` (no tests here): one fuzz run over ``/api/openapi.json``, every
exchange it made (from its HAR report), the server errors the daemon logged, and
what the fuzzing user owns before and after, so a test can tell that refused
requests changed nothing.

The fuzzer holds one token and must keep it: ``DELETE /api/tokens/{id}`` is left out
(a run that revoked its own token would test nothing but 401s afterwards), and
``token_works`` tells afterwards whether it still authenticates.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.integration.daemon import Daemon, api

FUZZ_USER = "fuzz"
# A running container the fuzzer is pointed at half of the time, so the endpoints
# behind ``{id}`` (files, exec, settings) see more than 404s.
SEED_CONTAINER = "fuzzbox"
EXCLUDED_OPERATIONS = ("revoke_token",)
# Fuzzing is many requests a second from one user: the default limits would answer
# most of them with 429 and leave the handlers behind untested.
DAEMON_OVERRIDES: dict[str, Any] = {
    "rate_limits": {"create_per_min": 100000, "ops_per_min": 100000, "read_per_min": 100000}
}
_CONFIG = """\
[dictionaries.containers]
values = ["{box}"]

[dictionaries.images]
values = ["busybox", "busybox:latest"]

[dictionaries.paths]
values = ["/home/user", "/tmp", "/home/user/f.txt", "/etc/passwd", "/proc/self/status"]

[parameters]
"path.id" = {{ dictionary = "containers", probability = 0.5 }}
"body.image" = {{ dictionary = "images", probability = 0.5 }}
"query.path" = {{ dictionary = "paths", probability = 0.5 }}
"""
# An access-log line of aiohttp: "... "METHOD /path HTTP/1.1" STATUS SIZE ..."
_ACCESS_500 = re.compile(r'"[A-Z]+ \S* HTTP/[\d.]+" 500 ')
_UNHANDLED = "unhandled error in"
_CREATE = re.compile(r"/api/containers(/stream)?")
_ONE_CONTAINER = re.compile(r"/api/containers/[^/]+")
# Calls that change a container's record when they succeed.
_LIFECYCLE = re.compile(r"/api/containers/[^/]+(/start|/stop|/restart|/settings)?")


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    status: int
    body: str


@dataclass(frozen=True)
class FuzzRun:
    exchanges: list[Exchange]
    returncode: int
    output: str
    seed: int

    def statuses(self) -> Counter[int]:
        return Counter(e.status for e in self.exchanges)

    def server_errors(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.status == 500]

    def accepted(self, method: str, path: re.Pattern[str]) -> int:
        """How many ``method`` calls on a path matching ``path`` got a 2xx."""
        return sum(
            1
            for e in self.exchanges
            if e.method == method and 200 <= e.status < 300 and path.fullmatch(e.path)
        )

    def changed_a_container(self) -> bool:
        return any(self.accepted(m, _LIFECYCLE) for m in ("POST", "PATCH", "DELETE")) or bool(
            self.accepted("POST", _CREATE)
        )


@dataclass(frozen=True)
class Holdings:
    """What the fuzzing user has, as the API lists it."""

    containers: int
    tokens: int
    images: int

    def expected_after(self, run: FuzzRun) -> Holdings:
        """Only accepted (2xx) calls may have changed anything."""
        return Holdings(
            containers=self.containers
            + run.accepted("POST", _CREATE)
            - run.accepted("DELETE", _ONE_CONTAINER),
            tokens=self.tokens + run.accepted("POST", re.compile("/api/tokens")),
            images=self.images + run.accepted("POST", re.compile("/api/images/import")),
        )


def _listed(d: Daemon, token: str, path: str, key: str) -> int:
    code, body, _ = api(d, "GET", path, token)
    assert code == 200, (path, code, body)
    return len(body[key])


def holdings(d: Daemon, token: str) -> Holdings:
    return Holdings(
        containers=_listed(d, token, "/api/containers", "containers"),
        tokens=_listed(d, token, "/api/tokens", "tokens"),
        images=_listed(d, token, "/api/images", "images"),
    )


def token_works(d: Daemon, token: str) -> bool:
    return api(d, "GET", "/api/tokens/validate", token)[0] == 200


def server_errors_in_log(d: Daemon) -> list[str]:
    """Access-log lines of 500 answers and the daemon's unhandled-error reports."""
    return [
        line for line in d.logs().splitlines() if _ACCESS_500.search(line) or _UNHANDLED in line
    ]


def _exchanges(har: Path) -> list[Exchange]:
    if not har.exists():
        return []
    entries = json.loads(har.read_text(errors="replace"))["log"]["entries"]
    return [
        Exchange(
            method=e["request"]["method"],
            path=urlsplit(e["request"]["url"]).path,
            status=int(e["response"]["status"]),
            body=str(e["response"].get("content", {}).get("text", ""))[:500],
        )
        for e in entries
    ]


def run_schemathesis(
    url: str,
    token: str,
    workdir: Path,
    *,
    max_time: int,
    workers: int = 1,
    seed: int | None = None,
    request_timeout: float = 30.0,
) -> FuzzRun:
    """One ``schemathesis run`` of every phase for ``max_time`` seconds, checking only
    that no answer is a server error (the caller judges the rest)."""
    workdir.mkdir(parents=True, exist_ok=True)
    seed = secrets.randbelow(2**31) if seed is None else seed
    config = workdir / "schemathesis.toml"
    config.write_text(_CONFIG.format(box=SEED_CONTAINER))
    har = workdir / "fuzz.har.json"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "--config-file",
        str(config),
        "run",
        f"{url}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-time",
        str(max_time),
        "--workers",
        str(workers),
        "--seed",
        str(seed),
        "--checks",
        "not_a_server_error",
        "--request-timeout",
        str(request_timeout),
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--no-color",
    ]
    for op in EXCLUDED_OPERATIONS:
        cmd += ["--exclude-operation-id", op]
    # The hypothesis database and any report go to the work dir, not the checkout.
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=max_time + 120)
    return FuzzRun(_exchanges(har), proc.returncode, proc.stdout + proc.stderr, seed)
