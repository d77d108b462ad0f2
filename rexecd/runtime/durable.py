"""Making a change on disk survive a crash: the daemon's own state directories (images,
volume images and quota trees), never a path a container controls."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Commit ``path``'s entries (a file created, renamed or removed in it) to disk: an
    fsync of the file alone does not make its name durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
