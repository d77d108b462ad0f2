"""Process identity and state from /proc: start times that tell a container's init from a
recycled pid, and whether a process is stopped."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None if ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if ``pid`` is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def state(pid: int) -> str | None:
    """Field 3 of /proc/PID/stat (``R``, ``S``, ``T`` stopped, ``t`` traced, ``Z``...), or
    None if ``pid`` is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[0].decode()


def parent(pid: int) -> int | None:
    """The parent pid of ``pid`` (a zombie's too), or None once it has been reaped."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def is_same_process(pid: int, recorded_start: int | None) -> bool:
    """Whether ``pid`` is alive and still the process that started at ``recorded_start``.

    A zombie is dead: an init that died while no daemon ran stays one until its new
    parent reaps it (some hosts' pid 1 never does), and must not be re-adopted."""
    if recorded_start is None:
        return False
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return False
    return int(fields[19]) == recorded_start


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
