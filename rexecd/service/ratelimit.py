"""Per-user request rate limits: three request classes, each a sliding one-minute window.

A sliding log (the times of the accepted requests in the last window) rather than
a token bucket: it is exact, which makes "10 per minute" mean what it says and
the ``Retry-After`` value true, and its memory is bounded by the limit itself.
A refused request is not recorded, so a client that keeps retrying too early does
not push its own recovery further away.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from rexecd.config import RateLimitsConfig

RateClass = Literal["create", "ops", "read"]
RATE_CLASSES: tuple[RateClass, ...] = ("create", "ops", "read")
WINDOW_S = 60.0
# How many checks between sweeps of users idle for a whole window.
_SWEEP_EVERY = 1024

_EXEC_RE = re.compile(r"^/containers/[^/]+/exec\Z")
# DOTALL: a file path may hold a newline (%0A) and is still a file endpoint.
_FILES_RE = re.compile(r"^/containers/[^/]+/files(/.*)?\Z", re.DOTALL)
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    # Seconds until a request of this class would be accepted; 0 when allowed.
    retry_after_s: float

    @property
    def retry_after_header(self) -> int:
        """Whole seconds for ``Retry-After``, rounded up so a client that obeys succeeds."""
        return max(1, math.ceil(self.retry_after_s)) if not self.allowed else 0


class RateLimiter:
    """Thread-safe; ``clock`` (monotonic seconds) is injectable for tests."""

    def __init__(
        self,
        limits: RateLimitsConfig,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: dict[tuple[str, RateClass], deque[float]] = {}
        self._checks = 0
        self.set_limits(limits)

    def set_limits(self, limits: RateLimitsConfig) -> None:
        with self._lock:
            self._limits: dict[RateClass, int] = {
                "create": limits.create_per_min,
                "ops": limits.ops_per_min,
                "read": limits.read_per_min,
            }

    def limit(self, cls: RateClass) -> int:
        return self._limits[cls]

    def check(self, user_id: str, cls: RateClass) -> RateDecision:
        """Count one request of ``cls`` for the user if the window has room."""
        return self._decide(user_id, cls, consume=True)

    def peek(self, user_id: str, cls: RateClass) -> RateDecision:
        """What ``check`` would answer, without counting a request."""
        return self._decide(user_id, cls, consume=False)

    def reset(self, user_id: str | None = None) -> None:
        with self._lock:
            if user_id is None:
                self._hits.clear()
            else:
                for cls in RATE_CLASSES:
                    self._hits.pop((user_id, cls), None)

    def _decide(self, user_id: str, cls: RateClass, *, consume: bool) -> RateDecision:
        limit = self._limits[cls]
        with self._lock:
            now = self._clock()
            self._checks += 1
            if self._checks % _SWEEP_EVERY == 0:
                self._sweep(now)
            hits = self._hits.get((user_id, cls))
            if hits is None:
                hits = self._hits[(user_id, cls)] = deque()
            horizon = now - self._window
            while hits and hits[0] <= horizon:
                hits.popleft()
            if len(hits) >= limit:
                return RateDecision(False, limit, 0, max(0.0, hits[0] + self._window - now))
            if consume:
                hits.append(now)
            return RateDecision(True, limit, limit - len(hits), 0.0)

    def _sweep(self, now: float) -> None:
        # Forget users with nothing in the window, so memory follows active users only.
        horizon = now - self._window
        idle = [k for k, hits in self._hits.items() if not hits or hits[-1] <= horizon]
        for key in idle:
            del self._hits[key]


def classify(method: str, path: str) -> RateClass | None:
    """The rate class of a request per API.md; None for ``/health`` (never limited).

    Creation: ``POST /containers``, ``/containers/stream`` and ``/containers/{id}/exec``.
    Operations: every other change, and every file endpoint (a download moves as much
    data as an upload). Reads: the remaining GETs, including WebSocket upgrades.
    """
    path = path.split("?", 1)[0].rstrip("/") or "/"
    if path.startswith("/api/"):
        path = path[len("/api") :]
    if path == "/health":
        return None
    method = method.upper()
    creating = path in ("/containers", "/containers/stream") or _EXEC_RE.fullmatch(path)
    if method == "POST" and creating:
        return "create"
    if _FILES_RE.fullmatch(path):
        return "ops"
    if method in _READ_METHODS:
        return "read"
    return "ops"
