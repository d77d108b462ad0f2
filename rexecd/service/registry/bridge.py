"""Bytes from the event loop to one blocking reader thread, with backpressure both ways.

The loop side ``put``s chunks as a download yields them and waits (without blocking the
loop) while the buffer is full; the thread side ``read``s like a file. Either side can
end the transfer: the loop with ``close`` (end of data) or ``fail`` (the download broke),
the thread with ``abort`` (the reader is done or failed), after which ``put`` raises
``BridgeClosed`` instead of waiting forever for room.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from rexecd.errors import RegistryError

T = TypeVar("T")


class BridgeClosed(Exception):
    """The reading side has stopped: there is no point sending more."""


class ByteBridge:
    def __init__(self, limit: int = 8 << 20) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._error: str | None = None
        self._aborted = False
        self._room = asyncio.Event()
        self._room.set()

    # --- the event loop's side ------------------------------------------------------

    async def put(self, data: bytes) -> None:
        if not data:
            return
        while True:
            with self._cond:
                if self._aborted:
                    raise BridgeClosed()
                if self._buffered < self._limit:
                    self._chunks.append(memoryview(data))
                    self._buffered += len(data)
                    self._cond.notify()
                    return
                # Cleared under the lock: the reader's wake-up can only come after it.
                self._room.clear()
            await self._room.wait()

    def close(self) -> None:
        """No more data: the reader sees the end of the stream once it has read all."""
        with self._cond:
            self._eof = True
            self._cond.notify()

    def fail(self, reason: str) -> None:
        """The transfer broke: the reader's next read raises instead of waiting."""
        with self._cond:
            self._error = reason
            self._cond.notify()

    # --- the reading thread's side --------------------------------------------------

    def read(self, n: int = -1, /) -> bytes:
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise RegistryError(f"download interrupted: {self._error}")
            if not self._chunks:
                return b""
            head = self._chunks[0]
            take = len(head) if n < 0 else min(n, len(head))
            out = bytes(head[:take])
            if take == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[take:]
            was_full = self._buffered >= self._limit
            self._buffered -= take
            if was_full and self._buffered < self._limit:
                self._loop.call_soon_threadsafe(self._room.set)
            return out

    def abort(self) -> None:
        """The reader is finished (or failed): release a writer waiting for room."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._buffered = 0
        self._loop.call_soon_threadsafe(self._room.set)


def run_in_thread(fn: Callable[..., T], *args: Any, name: str, **kwargs: Any) -> asyncio.Future[T]:
    """Run a long blocking call in a thread of its own (not the shared pool, which a few
    slow unpacks would otherwise fill) and await its result on the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def body() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # handed to the awaiting task, not lost in the thread
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=body, name=name, daemon=True).start()
    return fut
