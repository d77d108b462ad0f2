"""Image leases: which image each container was made from, pinned so its layers stay.

A lease is one JSON file per owner (a container id), ``ROOT/leases/<owner>.json``,
holding the ImageRecord the container was created from. It is the reference count of
the store: a layer is in use while an image record or a lease names it, and gc never
removes it before. A re-pull or re-tag that moves an image name to new content leaves
the container on the layers it was created on, as Docker keeps a container on its
image ID.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from rexecd.errors import InvalidRequest
from rexecd.runtime.durable import write_atomic

from .files import read_record
from .models import ImageRecord

_OWNER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")


class Leases:
    """The lease files under one directory. Callers hold the store's lock."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        root.mkdir(mode=0o700, exist_ok=True)

    def _path(self, owner: str) -> Path:
        if not _OWNER_RE.fullmatch(owner) or owner.startswith("."):
            raise InvalidRequest(f"invalid lease owner {owner!r}")
        return self.dir / f"{owner}.json"

    def put(self, owner: str, rec: ImageRecord) -> None:
        write_atomic(self._path(owner), rec.model_dump_json().encode())

    def get(self, owner: str) -> ImageRecord | None:
        return read_record(self._path(owner))

    def drop(self, owner: str) -> bool:
        try:
            self._path(owner).unlink()
            return True
        except FileNotFoundError:
            return False

    def items(self) -> Iterator[tuple[str, ImageRecord]]:
        for path in sorted(self.dir.glob("*.json")):
            rec = read_record(path)
            if rec is not None:
                yield path.stem, rec
