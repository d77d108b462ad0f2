"""Per-container quota'd storage: the ``Storage`` contract and its loop-device implementation.

One volume per (user, container name) holds the container's overlay upper/work dirs and
its /home/user. ``LoopStorage`` (a sparse ext4 image on a loop device) needs root, loop
and ext4 in the kernel (>= 5.8) and e2fsprogs. Modules: ``volume`` (model, layout,
validation), ``mountinfo`` (parsing), ``loopdev`` (loop ioctls), ``ext4`` (e2fsprogs and
ext4 ioctls), ``loop`` (``LoopStorage``).
"""

from __future__ import annotations

from rexecd.runtime.storage.loop import LoopStorage
from rexecd.runtime.storage.volume import MAX_SIZE_MB, MIN_SIZE_MB, Storage, Volume

__all__ = ["MAX_SIZE_MB", "MIN_SIZE_MB", "LoopStorage", "Storage", "Volume"]
