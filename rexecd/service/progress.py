"""A create's progress frames and the daemon's background tasks: small pieces every
part of the manager shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from rexecd.models import StreamProgress
from rexecd.service.interface import ProgressFn

log = logging.getLogger(__name__)


class Reporter:
    """Sends StreamProgress frames to an optional callback; never fails the create."""

    def __init__(self, fn: ProgressFn | None) -> None:
        self.fn = fn

    async def __call__(self, stage: str, message: str, progress: int, **extra: Any) -> None:
        if self.fn is None:
            return
        frame = StreamProgress.model_validate(
            {"stage": stage, "message": message, "progress": progress, **extra}
        )
        try:
            await self.fn(frame)
        except Exception:  # a gone SSE client must not break creation
            log.debug("progress receiver failed", exc_info=True)
            self.fn = None


class Background:
    """Tasks nobody awaits (log lines, event rows, watchers), held until they end and
    cancelled at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()
