"""Process identity from /proc: start times that tell a container's init from a recycled pid."""

from __future__ import annotations

import os


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


def reap_pidfd(pidfd: int) -> int | None:
    """Collect the exit of the process behind ``pidfd`` if it is our child (containers
    re-parent to the daemon, a subreaper, when the spawner dies): the exit code, or 128 +
    signal. None if it is not our child, not yet exited, or already reaped."""
    try:
        res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    if res is None:
        return None
    if res.si_code == os.CLD_EXITED:
        return res.si_status
    return 128 + res.si_status
