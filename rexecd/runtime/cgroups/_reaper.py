"""Emptying and removing a cgroup: freeze-kill-thaw loop, pid-reuse-safe signalling, rmdir."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from rexecd.errors import RuntimeFailure
from rexecd.runtime.cgroups._files import failure, subtree_dirs


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


def in_cgroup(pid: int, rel_paths: frozenset[str]) -> bool:
    """Whether ``pid`` sits in one of ``rel_paths`` (or below) per /proc/PID/cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        path = line.split(":", 2)[-1]
        for rel in rel_paths:
            if path == rel or path.startswith(rel + "/"):
                return True
    return False


def kill_member(pid: int, rel_paths: frozenset[str]) -> None:
    """SIGKILL ``pid`` only if it is still a member of our cgroup.

    The pid was read from cgroup.procs; if that process has exited and been reaped
    since (the daemon reaps container inits from another thread), the number may
    already name an unrelated host process. A pidfd pins the process, so checking
    membership after opening it and signalling through it cannot hit the wrong one.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        if in_cgroup(pid, rel_paths):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass  # exited between the check and the signal
    finally:
        os.close(pidfd)


def kill_all(
    list_pids: Callable[[], list[int]],
    rel_paths: frozenset[str],
    freeze: Callable[[float], None],
    thaw: Callable[[], None],
    timeout: float,
) -> None:
    """Kill until ``list_pids`` is empty; raise ``RuntimeFailure`` past ``timeout``.

    Each round freezes the cgroup first: a frozen process cannot fork, so the pid list
    read while frozen is complete, and the SIGKILLs are taken before any of them runs
    user code again after the thaw. Without a freezer the loop still converges on a
    fork-and-exit chain because every round kills what it sees.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = list_pids()
        if not pids:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeFailure(
                "cgroup kill", f"{len(pids)} processes remain: {pids[:10]}", errno.EBUSY
            )
        freeze(min(1.0, remaining))
        try:
            for pid in list_pids():
                kill_member(pid, rel_paths)
        finally:
            thaw()
        wait_for(lambda: not list_pids(), min(0.5, max(remaining, 0.0)))


def rmdir_retry(path: Path, deadline: float) -> None:
    """rmdir ``path``; absent is fine.

    rmdir answers EBUSY for a short while after the last process exited (the kernel
    releases the css asynchronously), so EBUSY is retried until ``deadline``.
    """
    delay = 0.005
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise failure("cgroup remove", exc, path) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def rmdir_tree(path: Path, timeout: float) -> None:
    """Remove ``path`` and the cgroups nested in it, deepest first; absent is fine."""
    deadline = time.monotonic() + timeout
    for sub in subtree_dirs(path):
        rmdir_retry(sub, deadline)
