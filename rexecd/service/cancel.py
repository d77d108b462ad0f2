"""Cancelling a create that still runs (its container deleted meanwhile): the token the
create carries, checked at its stage boundaries, and the two ways a long step is cut
short without leaving a thread behind.

Why not ``Task.cancel()``: a task cancelled while it awaits ``asyncio.to_thread`` stops
waiting, but the thread goes on; a ``runtime.start`` finishing after the rollback
would leave a running container nobody knows of. With the token every step of a
create either completes (and its undo runs) or never starts:

- ``check()`` between steps raises ``CreateCancelled`` before the next one begins;
- ``race(aw)`` stops waiting for an awaitable that owns no thread and whose
  cancellation leaves nothing behind (a shared, shielded image pull; a lock wait);
- ``cut_short(aw, cut)`` runs ``cut`` (kill the container's cgroup) when the token is
  cancelled while ``aw`` runs (the wait for the role build's exit; the spawn of an
  init that does not get ready), then still awaits ``aw``, which now ends promptly:
  the step completes, as a failure, and its undo runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# The reason a delete gives; the create's stream says it in its error frame.
DELETED = "container deleted while it was being created"


class CreateCancelled(Exception):
    """The create stopped at a step boundary because its token was cancelled."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CancelToken:
    """One create's cancellation flag; used from the event loop only."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._event = asyncio.Event()

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str = DELETED) -> None:
        """Ask the create to stop; the first reason given is the one reported."""
        if self.reason is None:
            self.reason = reason
            self._event.set()

    def check(self) -> None:
        """Raise ``CreateCancelled`` if the create was cancelled: called between steps."""
        if self.reason is not None:
            raise CreateCancelled(self.reason)

    async def race(self, aw: Awaitable[T]) -> T:
        """``aw``'s result, or ``CreateCancelled`` once the token is cancelled, whichever
        comes first. Only for awaitables that own no thread: ``aw`` is cancelled when the
        token wins. A result that is there when both are is returned (the caller's next
        ``check`` stops it then, with that step's undo)."""
        if self.cancelled:
            if inspect.iscoroutine(aw):
                aw.close()  # never started: no "never awaited" warning
            self.check()
        task = asyncio.ensure_future(aw)
        try:
            await self._either(task)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # its own cleanup runs before we go on
        if task.cancelled():
            self.check()  # the token's doing, else an outer cancel: re-raised below
        return task.result()

    async def cut_short(
        self,
        aw: Awaitable[T],
        cut: Callable[[], Awaitable[object]],
        again_s: float | None = None,
    ) -> T:
        """Await ``aw`` to its end; if the token is cancelled meanwhile, run ``cut``
        (which makes ``aw`` end soon) and go on awaiting it; with ``again_s``, ``cut``
        runs again that often while ``aw`` still runs (a process that joined the cgroup
        only after the last kill)."""
        task = asyncio.ensure_future(aw)
        try:
            await self._either(task)
            while not task.done():
                try:
                    await cut()
                except Exception:  # the step is still awaited: never left in its thread
                    log.warning("cutting a cancelled create's step short failed", exc_info=True)
                if again_s is None:
                    break
                await asyncio.wait({task}, timeout=again_s)
            return await task
        except BaseException:
            task.cancel()  # the caller itself was cancelled: ``aw`` goes with it
            raise

    async def _either(self, task: asyncio.Future[T]) -> None:
        """Return once ``task`` is done or the token cancelled, whichever comes first."""
        if self.cancelled:
            return
        waiter = asyncio.ensure_future(self._event.wait())
        either: list[asyncio.Future[Any]] = [task, waiter]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
