"""Unpack budgets: what one import or pull may still add to the image store.

A few KB of gzip expand to megabytes, of zstd to gigabytes, and a tar of empty
members costs an inode per 512 bytes: a hostile layer must be stopped while it
streams, not measured after it filled the disk. A ``Budget`` is made per import or
pull from the config's ``images.unpack`` limits and shared by every layer that
import unpacks (several at once in a pull, so it is thread-safe); each blob's
decompressed stream goes through a ``RatioGuard``. Going past a limit raises
``ImageTooLarge`` naming the setting; the store then discards the staged layer as
on any other unpack error.
"""

from __future__ import annotations

import tarfile
import threading
from typing import Any, Protocol

from rexecd.config import UnpackLimits
from rexecd.errors import ImageTooLarge

MB = 1 << 20
# tarfile reads a PAX extended header or a GNU long name/link member whole into memory
# before it looks at it; real ones are names and a few xattrs.
MAX_HEADER = 1 << 20
_HEADER_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Counted(Protocol):
    @property
    def count(self) -> int: ...


class Budget:
    """The bytes and inodes one import or pull may still unpack."""

    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.bytes = 0
        self.entries = 0
        self._lock = threading.Lock()

    def charge_bytes(self, n: int, label: str) -> None:
        with self._lock:
            self.bytes += n
            over = self.bytes > self.limits.max_image_mb * MB
        if over:
            raise ImageTooLarge(
                f"{label}: the image unpacks to more than images.unpack.max_image_mb "
                f"({self.limits.max_image_mb} MiB)",
                limit="max_image_mb",
            )

    def charge_entries(self, n: int, label: str) -> None:
        with self._lock:
            self.entries += n
            over = self.entries > self.limits.max_entries
        if over:
            raise ImageTooLarge(
                f"{label}: the image has more than images.unpack.max_entries "
                f"({self.limits.max_entries}) files and directories",
                limit="max_entries",
            )

    def check_name(self, name: str, depth: int, label: str) -> None:
        """Refuse a member name (or hardlink target) longer or deeper than allowed."""
        shown = name if len(name) <= 80 else name[:77] + "..."
        if len(name.encode("utf-8", "surrogateescape")) > self.limits.max_path_bytes:
            raise ImageTooLarge(
                f"{label}: member {shown!r}: name longer than images.unpack.max_path_bytes "
                f"({self.limits.max_path_bytes})",
                limit="max_path_bytes",
                member=shown,
            )
        if depth > self.limits.max_path_depth:
            raise ImageTooLarge(
                f"{label}: member {shown!r}: name deeper than images.unpack.max_path_depth "
                f"({self.limits.max_path_depth})",
                limit="max_path_depth",
                member=shown,
            )


class RatioGuard:
    """The decompressed stream of one blob, charged to ``budget`` as it is read and, when
    the blob is compressed, held to ``max_layer_ratio`` decompressed bytes per byte of
    ``compressed`` read so far (beyond ``ratio_slack_mb``)."""

    def __init__(
        self,
        plain: _Reader,
        compressed: _Counted,
        budget: Budget,
        label: str,
        *,
        ratio: bool,
    ) -> None:
        self._plain = plain
        self._compressed = compressed
        self._budget = budget
        self._label = label
        self._ratio = ratio
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._plain.read(n)
        if data:
            self.count += len(data)
            self._budget.charge_bytes(len(data), self._label)
            if self._ratio:
                self._check_ratio()
        return data

    def _check_ratio(self) -> None:
        lim = self._budget.limits
        allowed = lim.ratio_slack_mb * MB + lim.max_layer_ratio * self._compressed.count
        if self.count > allowed:
            raise ImageTooLarge(
                f"{self._label}: expands more than images.unpack.max_layer_ratio "
                f"({lim.max_layer_ratio}x beyond {lim.ratio_slack_mb} MiB): "
                f"{self.count} bytes from {self._compressed.count}",
                limit="max_layer_ratio",
            )


class HeaderTooLarge(Exception):
    """Raised from inside tarfile; the reader turns it into ImageTooLarge with its label
    (``refuse_header``)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def refuse_header(label: str, after: str, e: HeaderTooLarge) -> ImageTooLarge:
    return ImageTooLarge(
        f"{label}: after member {after!r}: a tar header of {e.size} bytes "
        f"(more than {MAX_HEADER})",
        limit="header",
    )


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose PAX and GNU long-name headers are refused past MAX_HEADER before
    tarfile reads them into memory (pass as ``tarfile.open(tarinfo=...)``); raises
    HeaderTooLarge."""

    def _proc_member(self, tarfile: Any) -> Any:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER:
            raise HeaderTooLarge(self.size)
        return super()._proc_member(tarfile)  # type: ignore[misc]
