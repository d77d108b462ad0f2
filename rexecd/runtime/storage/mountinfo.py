"""Parsing of /proc/self/mountinfo (proc(5)): what is mounted where in our mount namespace.

Pure text parsing; reading needs only a mounted /proc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: Path
    options: str
    fstype: str
    source: str
    super_options: str


def unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo so fields stay split.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> Mount | None:
    """One mountinfo line, or None if it is malformed.

    Fields: id parent major:minor root mountpoint options [optional...] - fstype source
    super-options. The optional fields vary in number, so the ``-`` separator is found
    by position, never assumed.
    """
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=unescape(fields[3]),
            mountpoint=Path(unescape(fields[4])),
            options=fields[5],
            fstype=fields[sep + 1],
            source=unescape(fields[sep + 2]),
            super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
        )
    except (ValueError, IndexError):
        return None


def parse(text: str) -> list[Mount]:
    """Every well-formed line of ``text``, in mount order (a later one hides an earlier
    one on the same mount point)."""
    return [m for m in (parse_line(line) for line in text.splitlines() if line) if m]


def read(path: Path = MOUNTINFO) -> list[Mount]:
    # surrogateescape: a mount point may hold any bytes; keep them round-trippable.
    return parse(path.read_text(encoding="utf-8", errors="surrogateescape"))
