"""Container events: an in-process fan-out to WebSocket subscribers, filtered per user."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rexecd.models import Event

log = logging.getLogger(__name__)

# A subscriber that falls this far behind is dropped rather than buffering forever.
QUEUE_BOUND = 1024


@dataclass(eq=False)
class _Subscriber:
    user_id: str
    queue: asyncio.Queue[Event | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_BOUND)
    )


class EventBus:
    """Publish events from the event loop; each subscriber gets its user's events in order."""

    def __init__(self) -> None:
        self._subs: set[_Subscriber] = set()

    def publish(self, user_id: str, event: Event) -> None:
        for sub in list(self._subs):
            if sub.user_id != user_id:
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("dropping a slow event subscriber of user %s", user_id)
                self._end(sub)

    def subscribe(self, user_id: str) -> AsyncIterator[Event]:
        """Events published from now on (registered at call time, not at first read,
        so nothing published between this call and the first ``anext`` is missed)."""
        sub = _Subscriber(user_id)
        self._subs.add(sub)
        return self._iterate(sub)

    async def _iterate(self, sub: _Subscriber) -> AsyncIterator[Event]:
        try:
            while True:
                event = await sub.queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._subs.discard(sub)

    def _end(self, sub: _Subscriber) -> None:
        """Make ``sub``'s iterator stop at its next read, whatever it had queued."""
        self._subs.discard(sub)
        while True:
            try:
                sub.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                sub.queue.get_nowait()

    def close(self) -> None:
        """End every subscription (daemon shutdown)."""
        for sub in list(self._subs):
            self._end(sub)
