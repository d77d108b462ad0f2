"""File helpers of the image store: reading records, tree removal and size (atomic
writes and directory syncs are rexecd.runtime.durable's)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .models import ImageRecord

log = logging.getLogger(__name__)


def read_record(path: Path) -> ImageRecord | None:
    """The ImageRecord at ``path``; None when absent or unreadable (logged)."""
    try:
        return ImageRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as e:
        log.error("ignoring unreadable image record %s: %s", path, e)
        return None


def rmtree(path: Path) -> None:
    def retry(func: Any, p: str, _exc: Any) -> None:
        # Unprivileged runs meet the images' read-only directories: open them up.
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=retry)


def tree_size(path: Path) -> int:
    """Bytes allocated under ``path`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
