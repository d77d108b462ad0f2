"""One worker thread per running container for blocking reads of what its tenant
controls (its /etc/passwd, its shell, its directory tree): like the store's own
thread (``storethread``), never the shared pool.

A hostile tree (a huge /etc/group, a directory with millions of entries) then slows
only requests to that same container; the shared pool, authentication and other
tenants' containers never wait behind it. The thread starts on first use and goes
when the container stops or is deleted (``close``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class TenantThreads:
    """A single-thread executor per container (db id)."""

    def __init__(self) -> None:
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def __len__(self) -> int:
        return len(self._pools)

    async def run(self, key: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on container ``key``'s thread."""
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ThreadPoolExecutor(1, thread_name_prefix="rexecd-tenant")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    def close(self, key: str) -> None:
        """Let ``key``'s thread end once its queued work is done (nothing waits here)."""
        pool = self._pools.pop(key, None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=False)

    def close_all(self) -> None:
        for key in list(self._pools):
            self.close(key)
