"""Pulling images from OCI registries (the distribution API) into the image store.

This lives in the service layer because its HTTP side is aiohttp on the daemon's event
loop, and the runtime layer has no asyncio. The part that touches the disk stays in
``runtime/images`` and blocks as it always did: each layer is unpacked by the store
in a thread of its own, reading the bytes through a ``ByteBridge`` as the event loop
receives them, so no layer ever lands in a temporary tarball.
"""

from __future__ import annotations

from .client import Endpoint, RegistryClient
from .pull import Puller, PullProgress, PullResult

__all__ = ["Endpoint", "PullProgress", "PullResult", "Puller", "RegistryClient"]
