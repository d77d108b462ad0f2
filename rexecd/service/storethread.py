"""The store's own worker thread: SQLite calls (token checks, record look-ups, /health)
never queue in the shared thread pool behind tenant work.

The default executor runs whatever the service hands it, and some of that is work a
tenant sizes (a directory listing, a download's reads, a spawn). Authentication and
/health must answer whatever tenants do, so the store, whose calls are all short and
serialised by its own lock anyway, gets one thread of its own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# One thread: the store's lock admits one call at a time, and FIFO order is fair.
# Created lazily by the executor on first use; the CLI never starts it.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rexecd-store")


async def in_store_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` (a ``Store`` call) on the store's thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))
