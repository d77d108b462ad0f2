"""cgroupfs file access for both drivers: one-write values, parsers, and OSError translation."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from rexecd.errors import RuntimeFailure


def failure(step: str, exc: OSError, path: Path | str) -> RuntimeFailure:
    """``exc`` as a ``RuntimeFailure`` for ``step``, with ``path`` attached if it lacks one."""
    if exc.filename is None:
        exc = OSError(exc.errno, exc.strerror or str(exc), str(path))
    return RuntimeFailure.from_oserror(step, exc)


def write(path: Path, value: str, step: str | None = None) -> None:
    """Write ``value`` with a single write(2): the kernel parses each write as one command,
    so a value split over two writes would be two (wrong) commands."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise failure(step or f"cgroup write {path.name}", exc, path) from exc


def read(path: Path, step: str | None = None) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError as exc:
        raise failure(step or f"cgroup read {path.name}", exc, path) from exc


def read_optional(path: Path) -> str | None:
    """The file's text, or None if it does not exist (controller not available, or the
    cgroup is being removed: kernfs then answers ENODEV)."""
    try:
        return read(path)
    except RuntimeFailure as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return None
        raise


def read_int(path: Path, default: int = 0) -> int:
    """An integer file; ``default`` if the file is absent; "max" reads as -1."""
    text = read_optional(path)
    if text is None:
        return default
    text = text.strip()
    return -1 if text == "max" else int(text)


def flat_keyed(text: str | None) -> dict[str, int]:
    """Parse "key value" lines (cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def procs(path: Path) -> list[int]:
    """The pids in ``path/cgroup.procs``; empty if the cgroup is gone."""
    text = read_optional(path / "cgroup.procs")
    return [int(p) for p in (text or "").split()]


def subtree_dirs(path: Path) -> list[Path]:
    """``path`` and every cgroup nested below it, deepest first (the rmdir order)."""
    out: list[Path] = []
    try:
        # A directory's link count is 2 + its subdirectories on cgroupfs (kernfs), as
        # on tmpfs and ext4: a leaf cgroup, the usual case, needs no listing of its
        # dozens of interface files (a third of a container's removal on v1, where
        # each of seven hierarchies is walked twice). Other counts mean "walk".
        if os.stat(path).st_nlink == 2:
            return [path]
        for dirpath, _dirs, _files in os.walk(path, topdown=False):
            out.append(Path(dirpath))
    except OSError:
        pass
    return out


def subtree_pids(paths: list[Path]) -> list[int]:
    """Every pid in the given cgroups and their descendants, sorted and unique."""
    pids: set[int] = set()
    for path in paths:
        for sub in subtree_dirs(path):
            pids.update(procs(sub))
    return sorted(pids)
