"""Per-user request rate limits: four request classes, each a sliding one-minute window.

A sliding log (the times of the accepted requests in the last window) rather than
a token bucket: it is exact, which makes "10 per minute" mean what it says and
the ``Retry-After`` value true, and its memory is bounded by the limit itself.
A refused request is not recorded, so a client that keeps retrying too early does
not push its own recovery further away.

Which class a request is in is declared by its route (``api.endpoint.Endpoint``);
how many a minute, by the config: defaults, then the user's tier, then the token's
broadest scope. A token with an exempt scope (``admin`` by default) is not limited.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from rexecd.config import RateLimitsConfig, RateNumbers

RateClass = Literal["create", "exec", "ops", "read"]
RATE_CLASSES: tuple[RateClass, ...] = ("create", "exec", "ops", "read")
WINDOW_S = 60.0
# How many checks between sweeps of users idle for a whole window.
_SWEEP_EVERY = 1024
# Broadest first: the scope whose override applies to a token holding several.
_SCOPE_ORDER = ("admin", "write", "read")


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
            self._cfg = limits

    def limit(self, cls: RateClass, tier: str | None = None, scopes: Iterable[str] = ()) -> int:
        """Requests of ``cls`` a minute for a user of ``tier`` with a token of ``scopes``."""
        return self._bucket(cls, tier, frozenset(scopes))[1]

    def exempt(self, scopes: Iterable[str]) -> bool:
        """Whether a token with ``scopes`` is never limited."""
        exempt = self._cfg.exempt_scopes
        return any(s in exempt for s in scopes)

    def check(
        self, user_id: str, cls: RateClass, tier: str | None = None, scopes: Iterable[str] = ()
    ) -> RateDecision:
        """Count one request of ``cls`` for the user if the window has room."""
        return self._decide(user_id, cls, tier, frozenset(scopes), consume=True)

    def peek(
        self, user_id: str, cls: RateClass, tier: str | None = None, scopes: Iterable[str] = ()
    ) -> RateDecision:
        """What ``check`` would answer, without counting a request."""
        return self._decide(user_id, cls, tier, frozenset(scopes), consume=False)

    def reset(self, user_id: str | None = None) -> None:
        with self._lock:
            if user_id is None:
                self._hits.clear()
            else:
                for cls in RATE_CLASSES:
                    self._hits.pop((user_id, cls), None)

    def _bucket(
        self, cls: RateClass, tier: str | None, scopes: frozenset[str]
    ) -> tuple[RateClass, int]:
        """The window a request counts in (exec shares create's unless it has a number of
        its own) and that window's limit for this tier and scope."""
        cfg = self._cfg
        layers: list[RateNumbers] = []
        if tier is not None and tier in cfg.tiers:
            layers.append(cfg.tiers[tier])
        by_scope = {s: n for s, n in cfg.scopes.items() if s in scopes}
        scope = next((s for s in _SCOPE_ORDER if s in by_scope), None)
        if scope is not None:
            layers.append(by_scope[scope])

        def number(field: str, base: int | None) -> int | None:
            for layer in reversed(layers):
                value: int | None = getattr(layer, field)
                if value is not None:
                    return value
            return base

        if cls == "exec":
            own = number("exec_per_min", cfg.exec_per_min)
            if own is not None:
                return "exec", own
            cls = "create"
        base = {
            "create": cfg.create_per_min,
            "ops": cfg.ops_per_min,
            "read": cfg.read_per_min,
        }[cls]
        found = number(f"{cls}_per_min", base)
        assert found is not None
        return cls, found

    def _decide(
        self,
        user_id: str,
        cls: RateClass,
        tier: str | None,
        scopes: frozenset[str],
        *,
        consume: bool,
    ) -> RateDecision:
        with self._lock:
            bucket, limit = self._bucket(cls, tier, scopes)
            now = self._clock()
            self._checks += 1
            if self._checks % _SWEEP_EVERY == 0:
                self._sweep(now)
            hits = self._hits.get((user_id, bucket))
            if hits is None:
                hits = self._hits[(user_id, bucket)] = deque()
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
