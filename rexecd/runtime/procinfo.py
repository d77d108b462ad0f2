"""Process identity from /proc: start times that tell a container's init from a recycled pid."""

from __future__ import annotations


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return int(rest[19])


def is_same_process(pid: int, recorded_start: int | None) -> bool:
    """Whether ``pid`` is alive and still the process that started at ``recorded_start``."""
    if recorded_start is None:
        return False
    return start_time(pid) == recorded_start
