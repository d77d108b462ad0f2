"""Per-user caps on requests in flight: how many execs and file operations one user may
have the daemon working on at once.

Rate limits count requests per minute; they do not bound what is running now. An
exec may run for minutes and a download streams for as long as its client reads,
so within any rate one user could pile up work. A request past its kind's cap is
refused at once (429 ``concurrency_limited``) rather than queued: a queue would only
move the pile-up, and a refusal tells the client to come back when one has finished.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from rexecd.config import ConcurrencyConfig
from rexecd.errors import ConcurrencyLimited

InFlightKind = Literal["exec", "files", "events"]
_WHAT: dict[InFlightKind, str] = {
    "exec": "exec requests",
    "files": "file operations",
    "events": "event streams",
}
# A slot frees when a request finishes, which is often at once: retry soon.
RETRY_AFTER_S = 1


class InFlightLimiter:
    """Counts per (user, kind); for the event loop only (no lock: nothing awaits
    between a check and its count)."""

    def __init__(self, caps: ConcurrencyConfig) -> None:
        self._caps: dict[InFlightKind, int] = {
            "exec": caps.exec_per_user,
            "files": caps.file_ops_per_user,
            "events": caps.event_streams_per_user,
        }
        self._count: dict[tuple[str, InFlightKind], int] = {}

    def limit(self, kind: InFlightKind) -> int:
        return self._caps[kind]

    def in_flight(self, user_id: str, kind: InFlightKind) -> int:
        return self._count.get((user_id, kind), 0)

    @contextmanager
    def hold(self, user_id: str, kind: InFlightKind) -> Iterator[None]:
        """One slot of ``kind`` for the duration of the block; ConcurrencyLimited if the
        user has none left."""
        key = (user_id, kind)
        now = self._count.get(key, 0)
        cap = self._caps[kind]
        if now >= cap:
            raise ConcurrencyLimited(
                f"too many {_WHAT[kind]} in flight: at most {cap} at once per user; "
                "retry when one has finished",
                limit=cap,
                retry_after=RETRY_AFTER_S,
            )
        self._count[key] = now + 1
        try:
            yield
        finally:
            left = self._count[key] - 1
            if left:
                self._count[key] = left
            else:
                del self._count[key]  # memory follows the users with work in flight
